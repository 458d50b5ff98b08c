"""SSSE erasure on MNIST LeNet-300-100 against retraining without the erased samples.

Trains LeNet-300-100 on the MNIST training split (55,000 images), then erases (a) a seeded 10%
of class 3's training images and (b) 1,000 random training images with one SSSE step
(:mod:`prunescope.erasure`), and compares each with a model retrained from the same
initialisation without those images. Reported per erasure set and step size ``eps``:

- accuracy and mean loss on the erased images, for the original, SSSE and retrained models, and
  the fraction of the original-to-retrained gap that SSSE closes (accuracy and loss);
- accuracy on the retained training images and on the test set, and the change against the
  original;
- the membership-style loss gap ``loss(unseen) - loss(erased)`` (unseen: test images of the
  erased classes);
- seconds: the Fisher (once per model), the erasure step, the retraining, and the speed-up.

With ``--sparsity S`` every model is sparse: trained dense, pruned by global magnitude to ``S``
and fine-tuned for ``--finetune-epochs`` with the mask held; the erasure holds that mask (pruned
weights stay exactly zero, checked), and the retrained reference reruns the whole pipeline
(dense training, pruning, fine-tuning) without the erased images, so its mask may differ.

Usage: ``python benchmarks/erasure.py [--epochs 2] [--eps 0.001 0.01 1] [--sparsity 0.9]``.
Prints a markdown table and writes bench/results/erasure.json (``erasure_sparse<S>.json`` with
``--sparsity``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from common import markdown_table, write_results

from prunescope import data, models
from prunescope.erasure import InverseFisher, class_positions, erase, measure
from prunescope.mask import Mask
from prunescope.sparsifier import MaskHold, prune
from prunescope.train import TrainConfig, fit


@dataclasses.dataclass(frozen=True)
class Budget:
    """How the original and every retrained model are made."""

    epochs: int
    sparsity: float = 0.0
    finetune_epochs: int = 1


def train(splits: data.Splits, train_set: data.Subset, budget: Budget, directory: Path
          ) -> tuple[torch.nn.Module, Mask | None, float]:
    """LeNet-300-100 from the seed-0 initialisation on ``train_set``, then (``budget.sparsity``
    > 0) pruned by global magnitude and fine-tuned with the mask held; model, mask, seconds."""
    torch.manual_seed(0)
    model = models.build("lenet300", num_classes=10, in_channels=1, image_size=28)
    subset = dataclasses.replace(splits, train=train_set)
    start = time.perf_counter()
    fit(model, subset, TrainConfig(epochs=budget.epochs, batch_size=256, lr=0.1,
                                   weight_decay=1e-4), directory / "dense", progress=False)
    mask = None
    if budget.sparsity > 0:
        mask = prune(model, "magnitude", "global", budget.sparsity)
        fit(model, subset, TrainConfig(epochs=budget.finetune_epochs, batch_size=256, lr=0.01,
                                       weight_decay=1e-4),
            directory / "finetune", hook=MaskHold(mask), progress=False)
    return model, mask, time.perf_counter() - start


def pruned_nonzero(model: torch.nn.Module, mask: Mask | None) -> int:
    """Weights the mask prunes that are not exactly zero (0 when the mask is held)."""
    if mask is None:
        return 0
    params = dict(model.named_parameters())
    return sum(int(params[name][~keep].count_nonzero()) for name, keep in mask.items())


def parts(splits: data.Splits, chosen: torch.Tensor):
    """Erased, retained and unseen (test images of the erased classes) subsets."""
    rest = torch.ones(len(splits.train), dtype=torch.bool)
    rest[chosen] = False
    erased = splits.train.select(chosen)
    unseen = torch.isin(splits.test.y, erased.y.unique()).nonzero().squeeze(1)
    return erased, splits.train.select(rest.nonzero().squeeze(1)), splits.test.select(unseen)


def closed(original: float, erased: float, retrained: float) -> float | None:
    """Fraction of the original-to-retrained gap that the erased model closes."""
    gap = retrained - original
    return None if abs(gap) < 1e-12 else (erased - original) / gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--eps", type=float, nargs="+",
                        default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 1.0])
    parser.add_argument("--fisher-samples", type=int, default=1024)
    parser.add_argument("--sparsity", type=float, default=0.0,
                        help="prune every model to this sparsity (global magnitude) and "
                             "fine-tune it with the mask held; the erasure holds the mask")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    args = parser.parse_args()
    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    budget = Budget(args.epochs, args.sparsity, args.finetune_epochs)
    splits = data.load("mnist")
    random_set = torch.randperm(len(splits.train),
                                generator=torch.Generator().manual_seed(1))[:1000].sort().values
    sets = {"class 3, 10%": class_positions(splits.train, 3, splits.classes, fraction=0.1),
            "1000 random": random_set}
    records, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        original, mask, train_seconds = train(splits, splits.train, budget, Path(tmp) / "o")
        start = time.perf_counter()
        inverse = InverseFisher.build(original, splits.train, mask=mask,
                                      samples=args.fisher_samples)
        fisher_seconds = time.perf_counter() - start
        for label, chosen in sets.items():
            erased, retained, unseen = parts(splits, chosen)
            retrained, _, retrain_seconds = train(splits, retained, budget,
                                                  Path(tmp) / label.replace(" ", "_"))
            base = measure(original, erased, retained, unseen, splits.test)
            gold = measure(retrained, erased, retained, unseen, splits.test)
            for eps in args.eps:
                model = copy.deepcopy(original)
                start = time.perf_counter()
                erase(model, erased, inverse, epsilon=eps)
                seconds = time.perf_counter() - start
                if pruned_nonzero(model, mask):
                    raise SystemExit(f"error: the erasure revived {pruned_nonzero(model, mask)} "
                                     "pruned weights; the mask was not held")
                ssse = measure(model, erased, retained, unseen, splits.test)
                record = {
                    "set": label, "erased": len(chosen), "epsilon": eps,
                    "original": base, "ssse": ssse, "retrained": gold,
                    "closed_accuracy": closed(base["erased"]["accuracy"],
                                              ssse["erased"]["accuracy"],
                                              gold["erased"]["accuracy"]),
                    "closed_loss": closed(base["erased"]["loss"], ssse["erased"]["loss"],
                                          gold["erased"]["loss"]),
                    "seconds": {"train": train_seconds, "retrain": retrain_seconds,
                                "fisher": fisher_seconds, "erase": seconds},
                    "speedup_erase": retrain_seconds / seconds,
                    "speedup_with_fisher": retrain_seconds / (seconds + fisher_seconds),
                }
                records.append(record)
                rows.append(dict(zip(HEADERS, _row(record), strict=True)))
    name = f"erasure_sparse{args.sparsity:g}" if args.sparsity else "erasure"
    path = write_results(name, [{"epochs": args.epochs, "fisher_samples": args.fisher_samples,
                                 "sparsity": args.sparsity,
                                 "finetune_epochs": args.finetune_epochs if args.sparsity else 0,
                                 "actual_sparsity": mask.sparsity if mask else 0.0},
                                *records])
    print(markdown_table(rows, HEADERS))
    print(f"\nresults: {path}")


HEADERS = ["set", "eps", "erased acc orig/SSSE/retrain", "gap closed (acc, loss)",
           "erased loss orig/SSSE/retrain", "retained acc change", "test acc orig/SSSE/retrain",
           "loss gap orig/SSSE/retrain", "erase s", "retrain s", "speed-up (with Fisher)"]


def _row(r: dict) -> list[str]:
    o, s, g = r["original"], r["ssse"], r["retrained"]

    def three(part: str, key: str, fmt: str) -> str:
        return "/".join(format(m[part][key], fmt) for m in (o, s, g))

    def frac(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    return [r["set"], f"{r['epsilon']:g}", three("erased", "accuracy", ".4f"),
            f"{frac(r['closed_accuracy'])}, {frac(r['closed_loss'])}",
            three("erased", "loss", ".4f"),
            f"{100 * (s['retained']['accuracy'] - o['retained']['accuracy']):+.2f} pt",
            three("test", "accuracy", ".4f"),
            "/".join(f"{m['loss_gap']:.4f}" for m in (o, s, g)),
            f"{r['seconds']['erase']:.3f}", f"{r['seconds']['retrain']:.1f}",
            f"{r['speedup_erase']:.0f}x ({r['speedup_with_fisher']:.0f}x)"]


if __name__ == "__main__":
    main()
