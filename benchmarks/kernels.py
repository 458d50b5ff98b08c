"""Sparse-kernel benchmark: dense PyTorch, SparseProp and prunescope side by side, in one run.

Layers: Linear 1024x1024, 768x3072 and 4096x4096 at batch 64 and 256; Conv2d 3x3 64->64 at 32x32
and 256->256 at 8x8 (padding 1) at batch 32; sparsities 0.8, 0.9, 0.95 and 0.98 (a uniformly
random mask with the exact count); fp32; 1 and 2 threads; the forward pass (no grad) and
forward + backward (input, weight and bias gradients).

Noise: the implementations of a case run in interleaved rounds (one call of each per round, the
rounds' orders balanced so that each implementation runs directly after each other one equally
often: ``common.balanced_orders``), and every ratio (dense / prunescope, SparseProp / prunescope)
is computed within a round, so a burst of other work slows both sides of a ratio alike; a case
reports the median ratio and its spread (min, quartiles, max over the rounds). The FLOP-ideal
fraction of a case is its speedup over dense divided by 1/(1 - sparsity). Each case also runs
the swap rule itself (``to_sparse`` on the layer, at the case's shape, for inference or
training): "after swap" is the speedup a user gets, 1.0 where the rule keeps the layer dense.
Then the lowest-margin cases (80%) run again while another process keeps one core busy with
dense matrix products (unless ``--no-beside-load``), and report the same ratios and swap
decisions.

Each implementation's outputs and gradients are compared with the reference computed in float64
(largest error relative to the largest reference entry). SparseProp runs if ``--sparseprop VENV``
holds its build (benchmarks/sparseprop_env.sh), and is reported as unavailable otherwise.

End to end: LeNet-300-100 on MNIST pruned to 95% (global magnitude): one epoch of fixed-mask
fine-tuning with ``prunescope.train.fit`` and the mask held, without and with
``sparse_kernels`` (what ``finetune.sparse_kernels`` / ``prunescope prune --sparse-kernels`` run),
and inference on the test set, timed alternately.

Writes bench/results/kernels.json (one record per case and pass), kernels_lenet.json,
kernels_summary.json and kernels.md (the tables), and prints the tables and the figures of
issue 14 (and those of issue 5 it replaced).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from common import (
    RESULTS,
    interleaved_medians,
    interleaved_times,
    machine,
    markdown_table,
    write_json_file,
)
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


def sparseprop_layer(dense: nn.Module, sparseprop, over_on: bool = True) -> nn.Module:
    bias = nn.Parameter(dense.bias.detach().clone())
    if isinstance(dense, nn.Linear):
        return sparseprop.SparseLinear(dense_weight=dense.weight.detach().clone(), bias=bias)
    return sparseprop.SparseConv2d(dense.weight.detach().clone(), bias=bias, padding=1, stride=1,
                                   vectorizing_over_on=over_on)


def best_sparseprop_layer(dense: nn.Module, x: torch.Tensor, sparseprop
                          ) -> tuple[nn.Module, bool | None]:
    """SparseProp's layer as its own ``sparsify_conv2d_auto`` would pick it for this layer and
    input, and its ``vectorizing_over_on`` (None for a Linear). Its conv has two kernels, and the
    faster one differs by shape (``vectorizing_over_on=True`` took 42-124 ms forward + backward at
    256->256 on 8 x 8 and 95-98%, against 17-25 ms with False; at 64->64 on 32 x 32 it was about
    1.6x the faster), so each conv case takes the faster correct one, timed forward + backward
    (the median of 5 after a warm-up call)."""
    if isinstance(dense, nn.Linear):
        return sparseprop_layer(dense, sparseprop), None
    with torch.no_grad():
        expected = dense(x)
    best, best_ms = None, math.inf
    for over_on in (False, True):
        layer = sparseprop_layer(dense, sparseprop, over_on)
        if relative_error(layer(x), expected.double()) > 1e-4:
            continue
        run = runner(layer, x, torch.ones_like(expected), "fwd+bwd")
        run()
        ms = statistics.median(_time(run) for _ in range(5))
        if ms < best_ms:
            best, best_ms = (layer, over_on), ms
    if best is None:
        raise RuntimeError("neither of SparseProp's conv kernels matches the dense layer")
    return best


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


def repeats_for(seconds: float, implementations: int) -> int:
    """Rounds for ~0.5 s per implementation and case: between 7 and 41, then rounded up to whole
    cycles of :func:`common.balanced_orders` (with three implementations 8 to 42, an even count:
    the median is then the mean of the middle two)."""
    rounds = int(min(41, max(7, 0.5 / max(seconds, 1e-6))))
    cycle = max(1, implementations - 1)
    return -(-rounds // cycle) * cycle


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, quartiles and max of ``values``."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") \
        if len(values) > 1 else (values[0],) * 3
    return {"median": median, "min": min(values), "q1": q1, "q3": q3, "max": max(values)}


def paired_ratios(times: dict[str, list[float]], over: str, of: str) -> list[float]:
    """times[over] / times[of] within each round."""
    return [a / b for a, b in zip(times[over], times[of], strict=True)]


def swap_decision(dense: nn.Module, mask: torch.Tensor, x: torch.Tensor, pass_: str) -> dict:
    """What the swap rule decides for this layer at this shape (it times the layer itself)."""
    model = nn.Sequential(copy.deepcopy(dense))
    example = x.detach().clone().requires_grad_(pass_ != "fwd")
    plan = kernels.to_sparse(model, prunescope.Mask({"0.weight": mask}), example,
                             training=pass_ != "fwd", verbose=False)
    choice = plan.layers[0]
    return {"sparse": choice.sparse, "rule_speedup": choice.speedup, "reason": choice.reason}


def bench_case(layer_kind, shape, batch, sparsity, threads, sparseprop, *, rule: bool = True
               ) -> list[dict]:
    """One record per pass: per-implementation median ms, paired ratios with their spread,
    errors against the float64 reference, and (with ``rule``) the swap rule's decision."""
    torch.set_num_threads(threads)
    dense, mask, x = make_case(layer_kind, shape, batch, sparsity)
    with torch.no_grad():
        grad = torch.randn_like(dense(x))
    reference = float64_reference(dense, x, grad)
    impls = {"dense": dense, "prunescope": (kernels.SparseLinear if layer_kind == "linear"
                                            else kernels.SparseConv2d).from_dense(dense, mask)}
    over_on = None
    if sparseprop is not None:
        impls["sparseprop"], over_on = best_sparseprop_layer(dense, x, sparseprop)
    name = f"{shape[0]}x{shape[1]}" if layer_kind == "linear" else \
        f"{shape[0]}->{shape[1]}@{shape[2]}x{shape[2]}"
    records = []
    for pass_ in PASSES:
        runs = {impl: runner(layer, x, grad, pass_) for impl, layer in impls.items()}
        start = time.perf_counter()
        runs["dense"]()
        times = interleaved_times(runs, repeats_for(time.perf_counter() - start, len(runs)))
        vs_dense = spread(paired_ratios(times, "dense", "prunescope"))
        record = {
            "layer": layer_kind, "shape": name, "batch": batch, "sparsity": sparsity,
            "threads": threads, "pass": pass_, "rounds": len(times["dense"]),
            "median_ms": {impl: statistics.median(t) for impl, t in times.items()},
            "vs_dense": vs_dense, "ideal_fraction": vs_dense["median"] * (1.0 - sparsity),
            "vs_sparseprop": spread(paired_ratios(times, "sparseprop", "prunescope"))
            if sparseprop is not None else None,
            "sparseprop_vectorizing_over_on": over_on,
            "max_rel_error": {impl: errors(layer, x, grad, mask, reference, pass_, sparseprop)
                              for impl, layer in impls.items()},
        }
        if rule:
            record["swap"] = swap_decision(dense, mask, x, pass_)
            record["after_swap"] = vs_dense if record["swap"]["sparse"] else \
                dict.fromkeys(vs_dense, 1.0)
        records.append(record)
    return records


class BackgroundLoad:
    """Another process keeping one core busy with dense float32 matrix products (1 thread,
    normal priority) while the ``with`` block runs; ended by its own pid afterwards."""

    CODE = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(384, 384)\n"
            "while True:\n    a = torch.tanh(a @ a)\n")

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, "-c", self.CODE])
        time.sleep(1.0)  # let it start computing
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=30)


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
    return module


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
def _spread_text(stats: dict | None) -> str:
    if stats is None:
        return "n/a"
    return (f"{stats['min']:.3g}, {stats['q1']:.3g}-{stats['q3']:.3g}, {stats['max']:.3g}")


def comparison_rows(records: list[dict]) -> list[dict]:
    """One table row per case and pass."""
    rows = []
    for r in records:
        ms, err = r["median_ms"], r["max_rel_error"]
        theirs = r["vs_sparseprop"]
        rows.append({
            "layer": r["layer"], "shape": r["shape"], "batch": r["batch"],
            "sparsity": r["sparsity"], "threads": r["threads"], "pass": r["pass"],
            "dense ms": ms["dense"], "sparseprop ms": ms.get("sparseprop", "n/a"),
            "prunescope ms": ms["prunescope"], "ideal": 1.0 / (1.0 - r["sparsity"]),
            "vs dense": r["vs_dense"]["median"], "spread vs dense": _spread_text(r["vs_dense"]),
            "of ideal": r["ideal_fraction"],
            "vs sparseprop": theirs["median"] if theirs else "n/a",
            "spread vs sparseprop": _spread_text(theirs),
            "rule": ("sparse" if r["swap"]["sparse"] else "dense") if "swap" in r else "n/a",
            "after swap": r["after_swap"]["median"] if "after_swap" in r else "n/a",
            "err prunescope": err["prunescope"], "err sparseprop": err.get("sparseprop", "n/a"),
            "err dense": err["dense"],
        })
    return rows


def summary_rows(records: list[dict]) -> list[dict]:
    """Per (layer, threads, sparsity, pass): medians over the cases, the worst case beside."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["layer"], r["threads"], r["sparsity"], r["pass"]), []).append(r)
    rows = []
    for (layer, threads, sparsity, pass_), group in groups.items():
        vs_dense = [r["vs_dense"]["median"] for r in group]
        fraction = [r["ideal_fraction"] for r in group]
        theirs = [r["vs_sparseprop"]["median"] for r in group if r["vs_sparseprop"]]
        after = [r["after_swap"]["median"] for r in group if "after_swap" in r]
        rows.append({
            "layer": layer, "threads": threads, "sparsity": sparsity, "pass": pass_,
            "cases": len(group), "ideal": 1.0 / (1.0 - sparsity),
            "vs dense (min)": f"{statistics.median(vs_dense):.3g} ({min(vs_dense):.3g})",
            "of ideal (min)": f"{statistics.median(fraction):.3g} ({min(fraction):.3g})",
            "vs sparseprop (min)": f"{statistics.median(theirs):.3g} ({min(theirs):.3g})"
            if theirs else "n/a",
            "after swap, min": f"{min(after):.3g}" if after else "n/a",
        })
    return rows


def figures(records: list[dict], lenet: list[dict] | None, beside: list[dict] | None
            ) -> list[dict]:
    """The issues' figures: what was reached, as checks (issue 14's first, then issue 5's)."""
    def pick(rs, **conditions):
        return [r for r in rs if all(cond(r[k]) if callable(cond) else r[k] == cond
                                     for k, cond in conditions.items())]

    def where(r: dict) -> dict:
        return {k: r[k] for k in ("layer", "shape", "batch", "sparsity", "threads", "pass")}

    high = {"sparsity": lambda s: s in (0.95, 0.98), "pass": "fwd+bwd"}
    checks = []
    for layer, target in (("linear", 0.5), ("conv2d", 0.4)):
        group = pick(records, layer=layer, **high)
        if group:
            value = statistics.median(r["ideal_fraction"] for r in group)
            checks.append({"figure": f"{layer} fwd+bwd at 95%/98%: median fraction of the FLOP "
                                     f"ideal >= {target}", "value": value,
                           "min": min(r["ideal_fraction"] for r in group),
                           "reached": value >= target})
    for layer in ("linear", "conv2d"):
        group = [r for r in pick(records, layer=layer, **high) if r["vs_sparseprop"]]
        if group:
            worst = min(group, key=lambda r: r["vs_sparseprop"]["median"])
            checks.append({"figure": f"{layer} fwd+bwd at 95%/98%: >= 2x over sparseprop on "
                                     "every case", "value": worst["vs_sparseprop"]["median"],
                           "case": where(worst),
                           "median": statistics.median(r["vs_sparseprop"]["median"]
                                                       for r in group),
                           "reached": worst["vs_sparseprop"]["median"] >= 2.0})
    for label, group in (("alone", records), ("beside a busy core", beside or [])):
        group = [r for r in group if "after_swap" in r]
        if group:
            worst = min(group, key=lambda r: r["after_swap"]["median"])
            checks.append({"figure": f"never slower than dense after the swap rule ({label}): "
                                     "least median speedup over the cases",
                           "value": worst["after_swap"]["median"], "case": where(worst),
                           "spread": _spread_text(worst["after_swap"]),
                           "reached": worst["after_swap"]["median"] >= 1.0})
    at90 = [r["vs_dense"]["median"] for r in pick(records, layer="linear", sparsity=0.9)]
    if at90:
        checks.append({"figure": "(issue 5) linear at 90%: >= 2x faster than dense on every "
                                 "case", "value": min(at90), "reached": min(at90) >= 2.0})
    worst = max(r["max_rel_error"]["prunescope"] for r in records)
    checks.append({"figure": "(issue 5) prunescope outputs and gradients within 1e-5 relative",
                   "value": worst, "reached": worst <= 1e-5})
    for run in lenet or []:
        checks.append({"figure": f"(issue 5) lenet300 95% fixed-mask fine-tuning epoch >= 2x "
                                 f"faster, {run['threads']} thread(s)",
                       "value": run["train_epoch_speedup"],
                       "reached": run["train_epoch_speedup"] >= 2.0})
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparseprop", help="SparseProp's benchmark environment (a venv)")
    parser.add_argument("--quick", action="store_true",
                        help="one case per layer kind (smoke; writes no results)")
    parser.add_argument("--skip-lenet", action="store_true")
    parser.add_argument("--no-beside-load", dest="beside_load", action="store_false",
                        help="skip the 80%% cases beside a process that keeps a core busy")
    args = parser.parse_args()
    started = time.perf_counter()
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
    beside = None
    if args.beside_load:
        beside = []
        low = min(sparsities)
        with BackgroundLoad():
            for t in threads:
                for kind, shape, batch in cases:
                    beside += bench_case(kind, shape, batch, low, t, sparseprop)
                    print(f"  beside load: {kind} {shape} batch {batch} sparsity {low} "
                          f"threads {t} done", flush=True)
    lenet = None if args.skip_lenet else [bench_lenet(threads=t) for t in threads]
    checks = figures(records, lenet, beside)
    load_end = os.getloadavg()
    seconds = time.perf_counter() - started
    report = render(records, beside, lenet, checks, sparseprop is not None, chosen.name,
                    load_start, load_end, seconds)
    print(report)
    if args.quick:  # a smoke run never replaces the full run's results
        print("quick run: bench/results not written")
        return
    write_json_file(RESULTS / "kernels.json", records)
    write_json_file(RESULTS / "kernels_summary.json", {
        "machine": machine(), "kernels": chosen.name, "load_average": [load_start, load_end],
        "seconds": seconds, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sparseprop": "available" if sparseprop is not None else "unavailable",
        "summary": summary_rows(records),
        "beside_load": beside, "figures": checks})
    if lenet:
        write_json_file(RESULTS / "kernels_lenet.json", lenet)
    (RESULTS / "kernels.md").write_text(report + "\n")
    print(f"wrote {RESULTS / 'kernels.json'} and kernels.md, kernels_summary.json")


CASE_COLUMNS = ["layer", "shape", "batch", "sparsity", "threads", "pass", "dense ms",
                "sparseprop ms", "prunescope ms", "vs dense", "spread vs dense", "ideal",
                "of ideal", "vs sparseprop", "spread vs sparseprop", "rule", "after swap",
                "err prunescope", "err sparseprop", "err dense"]


def render(records, beside, lenet, checks, have_sparseprop, backend_name, load_start, load_end,
           seconds) -> str:
    parts = [f"Kernels: {backend_name}; {seconds:.0f} s; load average {load_start[0]:.2f} at "
             f"start, {load_end[0]:.2f} at end; sparseprop "
             f"{'available' if have_sparseprop else 'unavailable (columns n/a)'}.",
             "vs dense / vs sparseprop: times faster than that implementation (> 1 = prunescope "
             "faster), the median over interleaved rounds of the ratio within a round; spread: "
             "min, q1-q3, max of those ratios; ideal: the FLOP ratio 1/(1 - sparsity); of ideal: "
             "vs dense / ideal; rule: what the swap rule (to_sparse, timed separately) chose; "
             "after swap: the speedup a user gets (1 where the rule keeps dense); err: largest "
             "error against the float64 reference relative to its largest entry.", "",
             "Medians over the cases of each row (the least case in brackets):", "",
             markdown_table(summary_rows(records), ["layer", "threads", "sparsity", "pass",
                                                    "cases", "ideal", "vs dense (min)",
                                                    "of ideal (min)", "vs sparseprop (min)",
                                                    "after swap, min"]),
             "", "Every case:", "", markdown_table(comparison_rows(records), CASE_COLUMNS)]
    if beside:
        parts += ["", "Beside other work (another process keeping one core busy with dense "
                  "matrix products, normal priority):", "",
                  markdown_table(comparison_rows(beside), CASE_COLUMNS)]
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
    parts += ["", "Figures of issue 14 (and of issue 5):"]
    for check in checks:
        value = check["value"]
        parts.append(f"- [{'x' if check['reached'] else ' '}] {check['figure']}: "
                     f"{value:.3g}" + (f" (min {check['min']:.3g})" if "min" in check else "")
                     + (f" (median {check['median']:.3g})" if "median" in check else "")
                     + (f" (spread {check['spread']})" if "spread" in check else "")
                     + (f" at {check['case']}" if "case" in check else ""))
    return "\n".join(parts)


if __name__ == "__main__":
    main()
