"""Sparse-kernel benchmark: dense PyTorch, SparseProp and prunescope side by side, in one run.

Layers: Linear 1024x1024, 768x3072 and 4096x4096 at batch 64 and 256; Conv2d 3x3 64->64 at 32x32
and 256->256 at 8x8 (padding 1) at batch 32; sparsities 0.8, 0.9, 0.95 and 0.98 (a uniformly
random mask with the exact count); fp32; 1 and 2 threads; the forward pass (no grad) and
forward + backward (input, weight and bias gradients). The three implementations of a case are
timed round-robin (medians over repeats after warm-up); each one's outputs and gradients are
compared with the reference computed in float64 (largest error relative to the largest reference
entry). SparseProp runs if ``--sparseprop VENV`` holds its build (benchmarks/sparseprop_env.sh),
and is reported as unavailable otherwise.

End to end: LeNet-300-100 on MNIST pruned to 95% (global magnitude): one epoch of fixed-mask
fine-tuning with ``prunescope.train.fit`` and the mask held, without and with
``sparse_kernels`` (what ``finetune.sparse_kernels`` / ``prunescope prune --sparse-kernels`` run),
and inference on the test set, timed alternately.

Writes bench/results/kernels.json (the records), kernels_lenet.json, kernels_summary.json and
kernels.md (the tables), and prints the tables and the figures of issue 5.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from common import RESULTS, interleaved_medians, machine, markdown_table, write_json_file
from torch import nn

import prunescope
from prunescope import kernels
from prunescope.kernels.training import PLAN
from prunescope.sparsifier import MaskHold
from prunescope.train import TrainConfig, evaluate, fit

LINEAR = [(1024, 1024), (768, 3072), (4096, 4096)]  # (in, out)
LINEAR_BATCHES = (64, 256)
CONV = [(64, 64, 32), (256, 256, 8)]  # (in channels, out channels, image side)
CONV_BATCH = 32
SPARSITIES = (0.8, 0.9, 0.95, 0.98)
THREADS = (1, 2)
PASSES = ("fwd", "fwd+bwd")


# -- layers and their three implementations -------------------------------------------------------
def make_case(layer: str, shape: tuple[int, ...], batch: int, sparsity: float):
    """A dense layer with exactly round(sparsity * numel) weights pruned, its mask and an input."""
    seed = zlib.crc32(repr((layer, shape, batch, sparsity)).encode())
    generator = torch.Generator().manual_seed(seed)
    if layer == "linear":
        dense, x_shape = nn.Linear(*shape), (batch, shape[0])
    else:
        dense, x_shape = nn.Conv2d(shape[0], shape[1], 3, padding=1), (batch, shape[0],
                                                                         shape[2], shape[2])
    weight = dense.weight
    keep = torch.zeros(weight.numel(), dtype=torch.bool)
    keep[torch.randperm(weight.numel(), generator=generator)[:round((1 - sparsity)
                                                                    * weight.numel())]] = True
    mask = keep.reshape(weight.shape)
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05 * mask)
        dense.bias.copy_(torch.randn(dense.bias.shape, generator=generator))
    return dense, mask, torch.randn(x_shape, generator=generator)


def sparseprop_layer(dense: nn.Module, sparseprop) -> nn.Module:
    bias = nn.Parameter(dense.bias.detach().clone())
    if isinstance(dense, nn.Linear):
        return sparseprop.SparseLinear(dense_weight=dense.weight.detach().clone(), bias=bias)
    return sparseprop.SparseConv2d(dense.weight.detach().clone(), bias=bias, padding=1, stride=1,
                                   vectorizing_over_on=sparseprop.over_on)


def dense_weight_grad(layer: nn.Module, sparseprop) -> torch.Tensor:
    """The weight gradient of any of the three implementations as a dense tensor."""
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        return layer.weight.grad
    if isinstance(layer, kernels.SparseLinear | kernels.SparseConv2d):
        return kernels.formats.densify(layer.values.grad, layer.mask)
    if isinstance(layer, sparseprop.SparseLinear):
        return sparseprop.from_csr_2d(layer.W_val.grad, layer.W_idx, (layer.N, layer.M))
    return sparseprop.from_sparse_format_conv2d(layer.W_val.grad, layer.W_idx,
                                                (layer.OC, layer.IC, layer.K, layer.K))


def runner(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, pass_: str) -> Callable:
    if pass_ == "fwd":
        def forward():
            with torch.no_grad():
                return layer(x)
        return forward
    x = x.detach().clone().requires_grad_()

    def forward_backward():
        for param in layer.parameters():
            param.grad = None
        x.grad = None
        layer(x).backward(grad)
        return x

    return forward_backward


def errors(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor,
           reference: dict[str, torch.Tensor], pass_: str, sparseprop) -> float:
    """Largest relative error of the outputs (and gradients) against the float64 reference."""
    for param in layer.parameters():
        param.grad = None
    xg = x.detach().clone().requires_grad_(pass_ != "fwd")
    y = layer(xg)
    worst = relative_error(y, reference["y"])
    if pass_ != "fwd":
        y.backward(grad)
        worst = max(worst, relative_error(xg.grad, reference["dx"]),
                    relative_error(dense_weight_grad(layer, sparseprop)[mask],
                                   reference["dw"][mask]),
                    relative_error(layer.bias.grad, reference["db"]))
    for param in layer.parameters():
        param.grad = None
    return worst


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item() or 1.0
    return (actual.detach().double() - expected).abs().max().item() / scale


def float64_reference(dense: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict:
    layer = copy.deepcopy(dense).double()
    xd = x.double().requires_grad_()
    y = layer(xd)
    y.backward(grad.double())
    return {"y": y.detach(), "dx": xd.grad, "dw": layer.weight.grad, "db": layer.bias.grad}


def repeats_for(seconds: float) -> int:
    """Enough repeats for ~1 s per implementation and case, between 5 and 40."""
    return int(min(40, max(5, 1.0 / max(seconds, 1e-6))))


def bench_case(layer_kind, shape, batch, sparsity, threads, sparseprop) -> list[dict]:
    torch.set_num_threads(threads)
    dense, mask, x = make_case(layer_kind, shape, batch, sparsity)
    with torch.no_grad():
        grad = torch.randn_like(dense(x))
    reference = float64_reference(dense, x, grad)
    impls = {"dense": dense, "prunescope": (kernels.SparseLinear if layer_kind == "linear"
                                            else kernels.SparseConv2d).from_dense(dense, mask)}
    if sparseprop is not None:
        impls["sparseprop"] = sparseprop_layer(dense, sparseprop)
    records = []
    for pass_ in PASSES:
        runs = {name: runner(layer, x, grad, pass_) for name, layer in impls.items()}
        start = time.perf_counter()
        runs["dense"]()
        reps = repeats_for(time.perf_counter() - start)
        times = interleaved_medians(runs, repeats=reps, warmup=2)
        name = f"{shape[0]}x{shape[1]}" if layer_kind == "linear" else \
            f"{shape[0]}->{shape[1]}@{shape[2]}x{shape[2]}"
        for impl, layer in impls.items():
            records.append({
                "layer": layer_kind, "shape": name, "batch": batch, "sparsity": sparsity,
                "threads": threads, "pass": pass_, "impl": impl, "median_ms": times[impl],
                "max_rel_error": errors(layer, x, grad, mask, reference, pass_, sparseprop),
            })
    return records


def load_sparseprop(venv: str | None):
    """SparseProp's modules from its benchmark environment, or None (with the reason printed)."""
    if not venv:
        print("sparseprop: unavailable (no --sparseprop environment given)")
        return None
    site = next(Path(venv).glob("lib/python*/site-packages"), None)
    if site is None or not (Path(venv) / ".sparseprop-ok").exists():
        print(f"sparseprop: unavailable (it did not build into {venv})")
        return None
    sys.path.append(str(site))  # after the project's own packages: torch stays the project's
    try:
        from sparseprop.modules import SparseConv2d, SparseLinear
        from sparseprop.modules.utils import from_csr_2d, from_sparse_format_conv2d
    except Exception as exc:  # any import failure means "unavailable", reported
        print(f"sparseprop: unavailable ({type(exc).__name__}: {exc})")
        return None
    module = argparse.Namespace(SparseLinear=SparseLinear, SparseConv2d=SparseConv2d,
                                from_csr_2d=from_csr_2d,
                                from_sparse_format_conv2d=from_sparse_format_conv2d)
    module.over_on = choose_over_on(module)
    return module


def choose_over_on(sparseprop) -> bool:
    """SparseProp's conv has two kernels; like its own sparsify_conv2d_auto, use the faster one
    (among the correct ones) on a benchmark-sized conv."""
    dense, mask, x = make_case("conv2d", (64, 64, 32), CONV_BATCH, 0.9)
    expected = dense(x)
    best, best_ms = True, math.inf
    for over_on in (False, True):
        sparseprop.over_on = over_on
        layer = sparseprop_layer(dense, sparseprop)
        if relative_error(layer(x), expected.double()) > 1e-4:
            continue
        ms = statistics.median(_time(runner(layer, x, torch.ones_like(expected), "fwd+bwd"))
                               for _ in range(3))
        if ms < best_ms:
            best, best_ms = over_on, ms
    print(f"sparseprop: conv vectorizing_over_on={best}")
    return best


def _time(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


# -- end to end -----------------------------------------------------------------------------------
def bench_lenet(rounds: int = 5, threads: int = 2) -> dict:
    """One fine-tuning epoch and test-set inference of LeNet-300-100 at 95%, dense vs sparse:
    the median epoch of ``rounds`` alternating dense / sparse runs, after one warm-up pair."""
    torch.set_num_threads(threads)
    splits = prunescope.data.load("mnist", seed=0)
    torch.manual_seed(0)
    pruned = prunescope.models.build("lenet300")
    config = TrainConfig(epochs=1, batch_size=128)
    with tempfile.TemporaryDirectory() as tmp:  # one dense epoch, so the mask is a trained one's
        fit(pruned, splits, config, tmp, progress=False)
    mask = prunescope.prune(pruned, "magnitude", "global", 0.95)
    seconds: dict[str, list[float]] = {"dense": [], "sparse": []}
    accuracy, swapped = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(-1, rounds):  # alternating, as a user would run it; round -1 warms up
            for name in ("dense", "sparse"):
                model = copy.deepcopy(pruned)
                run_config = dataclasses.replace(config, sparse_kernels=name == "sparse")
                record = fit(model, splits, run_config, Path(tmp) / f"{name}{r}",
                             hook=MaskHold(mask), progress=False)
                if r >= 0:
                    seconds[name].append(record["seconds"])
                accuracy[name] = evaluate(model, splits.test)["accuracy"]
                if name == "sparse":
                    swapped = json.loads((Path(tmp) / f"sparse{r}" / PLAN).read_text())
    dense_infer = copy.deepcopy(pruned)
    sparse_infer = copy.deepcopy(pruned)
    infer_plan = kernels.to_sparse(sparse_infer, mask, splits.test.x[:1000], training=False)
    infer = interleaved_medians({
        "dense": lambda: evaluate(dense_infer, splits.test),
        "sparse": lambda: evaluate(sparse_infer, splits.test)}, repeats=9, warmup=2)
    epoch = {k: statistics.median(v) for k, v in seconds.items()}
    return {
        "task": "lenet300 mnist, 95% global magnitude", "threads": threads,
        "train_epoch_s": epoch, "train_epoch_speedup": epoch["dense"] / epoch["sparse"],
        "test_inference_ms": infer, "test_inference_speedup": infer["dense"] / infer["sparse"],
        "test_accuracy_after_epoch": accuracy,
        "swapped_for_training": swapped["sparse_layers"], "plan_training": swapped["table"],
        "swapped_for_inference": infer_plan.swapped, "plan_inference": infer_plan.table(),
    }


# -- tables and figures ---------------------------------------------------------------------------
def comparison_rows(records: list[dict]) -> list[dict]:
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in records:
        key = (r["layer"], r["shape"], r["batch"], r["sparsity"], r["threads"], r["pass"])
        by_case.setdefault(key, {})[r["impl"]] = r
    rows = []
    for (layer, shape, batch, sparsity, threads, pass_), impls in by_case.items():
        ours, dense = impls["prunescope"], impls["dense"]
        theirs = impls.get("sparseprop")
        rows.append({
            "layer": layer, "shape": shape, "batch": batch, "sparsity": sparsity,
            "threads": threads, "pass": pass_, "dense ms": dense["median_ms"],
            "sparseprop ms": theirs["median_ms"] if theirs else "n/a",
            "prunescope ms": ours["median_ms"],
            "ideal": 1.0 / (1.0 - sparsity),
            "vs dense": dense["median_ms"] / ours["median_ms"],
            "sparseprop vs dense": dense["median_ms"] / theirs["median_ms"] if theirs else "n/a",
            "vs sparseprop": theirs["median_ms"] / ours["median_ms"] if theirs else "n/a",
            "err prunescope": ours["max_rel_error"],
            "err sparseprop": theirs["max_rel_error"] if theirs else "n/a",
            "err dense": dense["max_rel_error"],
        })
    return rows


def figures(rows: list[dict], lenet: dict | None) -> list[dict]:
    """The issue's figures: what was reached, as checks."""
    def pick(**conditions):
        return [r for r in rows if all(cond(r[k]) if callable(cond) else r[k] == cond
                                       for k, cond in conditions.items())]

    high = {"sparsity": lambda s: s in (0.95, 0.98), "pass": "fwd+bwd"}
    checks = []
    for layer, target in (("linear", 1.5), ("conv2d", 2.0)):
        ratios = [r["vs sparseprop"] for r in pick(layer=layer, **high)
                  if r["vs sparseprop"] != "n/a"]
        if ratios:
            checks.append({"figure": f"{layer} fwd+bwd at 95%/98%: median speedup over "
                                     f"sparseprop >= {target}x",
                           "value": statistics.median(ratios), "min": min(ratios),
                           "reached": statistics.median(ratios) >= target})
    at90 = [r["vs dense"] for r in pick(layer="linear", sparsity=0.9)]
    if at90:
        checks.append({"figure": "linear at 90%: >= 2x faster than dense on every case",
                       "value": min(at90), "reached": min(at90) >= 2.0})
    slowest = min(rows, key=lambda r: r["vs dense"])
    checks.append({"figure": "kernel never slower than dense on any case (the swap rule keeps "
                             "such layers dense)", "value": slowest["vs dense"],
                   "case": {k: slowest[k] for k in ("layer", "shape", "batch", "sparsity",
                                                     "threads", "pass")},
                   "reached": slowest["vs dense"] >= 1.0})
    worst = max(r["err prunescope"] for r in rows)
    checks.append({"figure": "prunescope outputs and gradients within 1e-5 relative",
                   "value": worst, "reached": worst <= 1e-5})
    for run in lenet or []:
        checks.append({"figure": f"lenet300 95% fixed-mask fine-tuning epoch >= 2x faster, "
                                 f"{run['threads']} thread(s)",
                       "value": run["train_epoch_speedup"],
                       "reached": run["train_epoch_speedup"] >= 2.0})
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparseprop", help="SparseProp's benchmark environment (a venv)")
    parser.add_argument("--quick", action="store_true", help="one case per layer kind (smoke)")
    parser.add_argument("--skip-lenet", action="store_true")
    args = parser.parse_args()
    load_start = os.getloadavg()
    chosen = kernels.backend()
    print(f"prunescope kernels: {chosen.name}; load average at start {load_start[0]:.2f}")
    sparseprop = load_sparseprop(args.sparseprop)
    cases = [("linear", s, b) for s in LINEAR for b in LINEAR_BATCHES] + \
            [("conv2d", c, CONV_BATCH) for c in CONV]
    sparsities, threads = SPARSITIES, THREADS
    if args.quick:
        cases, sparsities, threads = [cases[0], cases[-1]], (0.95,), (2,)
    records = []
    for t in threads:
        for kind, shape, batch in cases:
            for sparsity in sparsities:
                records += bench_case(kind, shape, batch, sparsity, t, sparseprop)
                print(f"  {kind} {shape} batch {batch} sparsity {sparsity} threads {t} done",
                      flush=True)
    lenet = None if args.skip_lenet else [bench_lenet(threads=t) for t in threads]
    rows = comparison_rows(records)
    checks = figures(rows, lenet)
    load_end = os.getloadavg()
    report = render(rows, lenet, checks, sparseprop is not None, chosen.name, load_start,
                    load_end)
    print(report)
    write_json_file(RESULTS / "kernels.json", records)
    write_json_file(RESULTS / "kernels_summary.json", {
        "machine": machine(), "kernels": chosen.name, "load_average": [load_start, load_end],
        "sparseprop": "available" if sparseprop is not None else "unavailable",
        "figures": checks})
    if lenet:
        write_json_file(RESULTS / "kernels_lenet.json", lenet)
    (RESULTS / "kernels.md").write_text(report + "\n")
    print(f"wrote {RESULTS / 'kernels.json'} and kernels.md, kernels_summary.json")


def render(rows, lenet, checks, have_sparseprop, backend_name, load_start, load_end) -> str:
    columns = ["layer", "shape", "batch", "sparsity", "threads", "pass", "dense ms",
               "sparseprop ms", "prunescope ms", "vs dense", "ideal", "sparseprop vs dense",
               "vs sparseprop", "err prunescope", "err sparseprop", "err dense"]
    parts = [f"Kernels: {backend_name}; load average {load_start[0]:.2f} at start, "
             f"{load_end[0]:.2f} at end; sparseprop "
             f"{'available' if have_sparseprop else 'unavailable (columns n/a)'}.",
             "vs dense / vs sparseprop: times faster than that implementation (> 1 = prunescope "
             "faster); ideal: the FLOP ratio 1/(1 - sparsity); err: largest error against the "
             "float64 reference relative to its largest entry.", "",
             markdown_table(rows, columns)]
    for run in lenet or []:
        parts += ["", f"LeNet-300-100 on MNIST at 95% ({run['threads']} thread(s), medians of "
                  "alternating runs): fine-tuning epoch (train.fit, validation included) dense "
                  f"{run['train_epoch_s']['dense']:.2f} s, sparse "
                  f"{run['train_epoch_s']['sparse']:.2f} s ({run['train_epoch_speedup']:.2f}x); "
                  f"test-set inference dense {run['test_inference_ms']['dense']:.1f} ms, sparse "
                  f"{run['test_inference_ms']['sparse']:.1f} ms "
                  f"({run['test_inference_speedup']:.2f}x); test accuracy after the epoch "
                  f"{run['test_accuracy_after_epoch']}",
                  "", run["plan_training"], "", run["plan_inference"]]
    parts += ["", "Figures of issue 5:"]
    for check in checks:
        value = check["value"]
        parts.append(f"- [{'x' if check['reached'] else ' '}] {check['figure']}: "
                     f"{value:.3g}" + (f" (min {check['min']:.3g})" if "min" in check else "")
                     + (f" at {check['case']}" if "case" in check else ""))
    return "\n".join(parts)


if __name__ == "__main__":
    main()
