"""Pruning-mechanics benchmark: prunescope next to torch.nn.utils.prune, in one run.

1. One-shot global magnitude pruning to 90% (resnet50, 23.5M prunable weights; lenet300):
   ``prunescope.prune`` vs ``torch.nn.utils.prune.global_unstructured`` (+ ``prune.remove``).
2. Cost of holding a mask during training (lenet300 on MNIST-shaped batches of 128, SGD with
   momentum): a dense step, prunescope's in-place mask maintenance (gradients masked before the
   step, weights re-zeroed after) and torch's reparametrisation (``weight = weight_orig * mask``
   recomputed in every forward).
3. Effective sparsity of a 90%-sparse mask (resnet20, resnet50).

Prints a markdown table and writes bench/results/pruning.json.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from common import interleaved_medians, markdown_table, median_ms, write_results
from torch.nn.utils import prune as torch_prune

import prunescope
from prunescope import models
from prunescope.sparsifier import MaskHold
from prunescope.targets import select


def _torch_global_magnitude(model: torch.nn.Module, sparsity: float) -> None:
    pairs = [(model.get_submodule(n.rpartition(".")[0]), "weight") for n in select(model)]
    torch_prune.global_unstructured(pairs, pruning_method=torch_prune.L1Unstructured,
                                    amount=sparsity)
    for module, name in pairs:
        torch_prune.remove(module, name)


def bench_one_shot(name: str, sparsity: float = 0.9) -> list[dict]:
    torch.manual_seed(0)
    base = models.build(name, num_classes=1000 if name == "resnet50" else 10)
    repeats = 3 if name == "resnet50" else 7
    ours = median_ms(lambda: prunescope.prune(copy.deepcopy(base), "magnitude", "global",
                                              sparsity), repeats=repeats, warmup=1)
    theirs = median_ms(lambda: _torch_global_magnitude(copy.deepcopy(base), sparsity),
                       repeats=repeats, warmup=1)
    copy_only = median_ms(lambda: copy.deepcopy(base), repeats=repeats, warmup=1)
    return [
        {"task": f"one-shot global magnitude 90%, {name}", "impl": impl, "median_ms": ms,
         "ratio_vs_torch_prune": (theirs - copy_only) / (ms - copy_only)}
        for impl, ms in (("prunescope", ours), ("torch.nn.utils.prune", theirs))
    ]


def bench_mask_holding(sparsity: float = 0.9, batch: int = 128) -> list[dict]:
    torch.manual_seed(0)
    inputs, targets = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def stepper(model, hook=None):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            if hook:
                hook.before_optimizer_step(model, 0)
            optimizer.step()
            if hook:
                hook.after_optimizer_step(model, 0)
        return step

    dense = models.build("lenet300")
    ours = copy.deepcopy(dense)
    hook = MaskHold(prunescope.prune(ours, "magnitude", "global", sparsity))
    theirs = copy.deepcopy(dense)
    pairs = [(theirs.get_submodule(n.rpartition(".")[0]), "weight") for n in select(theirs)]
    torch_prune.global_unstructured(pairs, pruning_method=torch_prune.L1Unstructured,
                                    amount=sparsity)
    ms = interleaved_medians({"dense (no mask)": stepper(dense),
                              "prunescope MaskHold": stepper(ours, hook),
                              "torch.nn.utils.prune reparam": stepper(theirs)},
                             repeats=30, warmup=5, inner=10)
    reference = ms["torch.nn.utils.prune reparam"]
    return [{"task": "training step with a 90% mask, lenet300, batch 128", "impl": impl,
             "median_ms": value, "ratio_vs_torch_prune": reference / value}
            for impl, value in ms.items()]


def bench_effective(name: str) -> list[dict]:
    torch.manual_seed(0)
    model = models.build(name, num_classes=1000 if name == "resnet50" else 10)
    mask = prunescope.prune(model, "random", "uniform", 0.9)
    ms = median_ms(lambda: prunescope.effective_sparsity(model, mask), repeats=3, warmup=1)
    return [{"task": f"effective sparsity, {name} at 90%", "impl": "prunescope",
             "median_ms": ms, "ratio_vs_torch_prune": float("nan")}]


def main() -> None:
    records = (bench_one_shot("lenet300") + bench_one_shot("resnet50") + bench_mask_holding()
               + bench_effective("resnet20") + bench_effective("resnet50"))
    print(markdown_table(records, ["task", "impl", "median_ms", "ratio_vs_torch_prune"]))
    print("\nratio_vs_torch_prune > 1 means prunescope is faster (copy time excluded for one-shot)")
    print(f"wrote {write_results('pruning', records)}")


if __name__ == "__main__":
    main()
