"""DRoP benchmark (issue 12): Random+DRoP against random, EL2N and forgetting data pruning on
``mnist_lt``.

For each seed and density (0.3, 0.5) the training set of long-tailed MNIST is pruned by random
selection, by EL2N (3 scoring models of 2 epochs), by forgetting counts (one model of E epochs,
the whole training run as in Toneva et al. 2019), by Random+DRoP and Forgetting+DRoP
(``drop_code`` quotas from 3 query models of 2 epochs; ``--paper`` adds Random+DRoP with
``drop_paper``), then a LeNet-300-100 trains on the kept examples for
E' = floor((0.5 + 0.5 d) E / d) epochs and is evaluated on the test half of the DRoP protocol;
the same model on the full training set (E epochs) is the reference. Prints the mean over seeds
with a 95% t-interval of overall accuracy and worst-class recall, and the paired difference of
each DRoP variant against the baselines; writes bench/results/drop.json.

``--track minilm``: the same protocol on the transformer track, all-MiniLM-L6-v2 fine-tuned on
the tweets, with the data, model, training and data_pruning entries of
``recipes/drop-minilm.yaml`` (``--set key=value`` overrides it); writes
bench/results/drop_minilm.json. Finished trainings are read back, so a second call with more
seeds adds to the first.

    .venv/bin/python benchmarks/drop.py [--seeds 3] [--epochs 10] [--out runs/bench-drop]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/drop.py --track minilm --seeds 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import markdown_table, write_results

from prunescope.data_pruning import DataPruningSpec, prune_with, train_on
from prunescope.run import Run
from prunescope.train import TrainConfig

DENSITIES = (0.3, 0.5)
MINILM = Path(__file__).resolve().parent.parent / "recipes" / "drop-minilm.yaml"
# two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, T95[len(values) - 1] * statistics.stdev(values) / len(values) ** 0.5


def mnist_seed(seed: int, epochs: int, out: Path, quotas: tuple[str, ...]) -> list[dict]:
    """The ``mnist_lt`` track: LeNet-300-100, E = ``epochs``."""
    run = Run.from_dataset("mnist_lt", "lenet300", out / f"seed{seed}", seed=seed, progress=False,
                           train=TrainConfig(epochs=epochs, batch_size=128, lr=0.05))
    specs = [DataPruningSpec(1.0, "random")]  # the full training set, once
    for density in DENSITIES:
        specs += [DataPruningSpec(density, "random"), DataPruningSpec(density, "el2n"),
                  DataPruningSpec(density, "forgetting", score_epochs=epochs)]
        specs += [DataPruningSpec(density, "random", quota) for quota in quotas]
        specs += [DataPruningSpec(density, "forgetting", "drop_code", score_epochs=epochs)]
    return run_specs(run, seed, specs)


def minilm_seed(seed: int, out: Path, overrides: list[str]) -> list[dict]:
    """The transformer track: ``recipes/drop-minilm.yaml`` (its data, model, training and
    data_pruning entries) with the recipe's seed set to ``seed``."""
    from prunescope import experiment, recipe

    loaded = recipe.load(MINILM, [*overrides, f"seed={seed}"])
    run = experiment.run_for(loaded, out / f"seed{seed}", progress=False)
    specs = [DataPruningSpec(1.0, "random")] + [m.spec for m in loaded.prune.methods]
    return run_specs(run, seed, specs)


def run_specs(run: Run, seed: int, specs: list[DataPruningSpec]) -> list[dict]:
    """Prune ``run``'s training set under each spec, train on it, evaluate (density 1: the
    full-data reference)."""
    records = []
    for spec in specs:
        start = time.perf_counter()
        kept = prune_with(run, spec)
        result = train_on(run, kept, run.out / spec.label, density=spec.density,
                          desc=spec.label)
        method = "full data" if spec.density == 1.0 else spec.label.split("-d")[0]
        records.append({"seed": seed, "density": spec.density, "method": method,
                        "accuracy": result["accuracy"],
                        "worst_class_recall": result["worst_class_recall"],
                        "worst_class": result["worst_class"], "epochs": result["epochs"],
                        "kept_per_class": result["kept_per_class"],
                        "per_class_recall": result["per_class_recall"],
                        "seconds": time.perf_counter() - start})
        print(f"seed {seed} d={spec.density} {method}: acc {result['accuracy']:.4f}, worst "
              f"{result['worst_class_recall']:.4f} (class {result['worst_class']}), kept "
              f"{result['kept_per_class']} ({records[-1]['seconds']:.0f} s)", flush=True)
    return records


def summary(records: list[dict]) -> list[dict]:
    rows = []
    for density in (1.0, *DENSITIES):
        methods = dict.fromkeys(r["method"] for r in records if r["density"] == density)
        for method in methods:
            chosen = [r for r in records if r["density"] == density and r["method"] == method]
            acc, acc_ci = interval([r["accuracy"] for r in chosen])
            worst, worst_ci = interval([r["worst_class_recall"] for r in chosen])
            rows.append({"density": density, "method": method, "seeds": len(chosen),
                         "accuracy": f"{100 * acc:.2f} ± {100 * acc_ci:.2f}",
                         "worst-class recall": f"{100 * worst:.2f} ± {100 * worst_ci:.2f}"})
    return rows


PAIRS = (("random+drop_code", "random"), ("random+drop_code", "el2n"),
         ("random+drop_code", "forgetting"), ("forgetting+drop_code", "forgetting"))


def paired(records: list[dict]) -> list[dict]:
    """Each DRoP variant minus its baselines (:data:`PAIRS`), paired by seed, in points with
    95% t-intervals."""
    rows = []
    for density in DENSITIES:
        at = {(r["method"], r["seed"]): r for r in records if r["density"] == density}
        for ours, base in PAIRS:
            seeds = sorted(s for m, s in at if m == base and (ours, s) in at)
            if not seeds:
                continue
            for key in ("worst_class_recall", "accuracy"):
                diff, ci = interval([100 * (at[ours, s][key] - at[base, s][key]) for s in seeds])
                rows.append({"density": density, "method": ours, "vs": base, "metric": key,
                             "difference (points)": f"{diff:+.2f} ± {ci:.2f}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--track", choices=("mnist_lt", "minilm"), default="mnist_lt")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="E of the mnist_lt track")
    parser.add_argument("--paper", action="store_true", help="also run drop_paper (mnist_lt)")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="a recipe override of the minilm track, e.g. data.train_size=1000")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    out = args.out or Path("runs") / ("bench-drop" if args.track == "mnist_lt"
                                      else "bench-drop-minilm")
    seeds = range(args.seeds)  # finished trainings are read back: more seeds add to them
    quotas = ("drop_code", "drop_paper") if args.paper else ("drop_code",)
    name = "drop" if args.track == "mnist_lt" else "drop_minilm"
    records: list[dict] = []
    for seed in seeds:  # the tables and the file after every seed: a stopped run keeps them
        records += (minilm_seed(seed, out, args.overrides) if args.track == "minilm"
                    else mnist_seed(seed, args.epochs, out, quotas))
        print(f"\nafter seed {seed}:")
        print(markdown_table(summary(records), ["density", "method", "seeds", "accuracy",
                                                "worst-class recall"]))
        print()
        print(markdown_table(paired(records), ["density", "method", "vs", "metric",
                                               "difference (points)"]))
        print(f"\n{time.perf_counter() - start:.0f} s in all")
        print(write_results(name, records), flush=True)


if __name__ == "__main__":
    main()
