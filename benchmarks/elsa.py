"""ELSA benchmark: each level of one nested model against a model trained for that level alone.

One recipe per seed, run through the experiment stages: the dense model (``--epochs`` epochs;
the dense level's comparison, and the source of ELSA's admission magnitudes and starting
values), one or more ELSA variants (``--variants``, each with the same total budget: the top
level by GMP on ``--top-share`` of the epochs, the rest split evenly over the denser levels)
and GMP trained separately for each sparse level on all ``--epochs`` epochs. "The same total
budget" is read as: each separately trained model gets as many epochs as ELSA's whole run
(top plus every level); the dense level is compared with the dense model.

Prints, per variant and level, the test and validation accuracy of ELSA and of the separate
model and the gaps in points (mean and range over the seeds), and the bytes of one nested
checkpoint against the four separate ones; writes ``bench/results/<--name>.json``. Variants are
chosen on the *validation* gaps (``--val-size`` examples held out of the training set); the
test gaps are reported, not used to choose.

    .venv/bin/python benchmarks/elsa.py [--dataset digits] [--model lenet300] [--epochs 24]
        [--seeds 0 1 2] [--variants default] [--batch-size 64] [--train-size N] [--val-size N]
        [--name elsa]
        [--out runs/bench-elsa]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import markdown_table, write_results

from prunescope import experiment, recipe

LEVELS = (0.98, 0.95, 0.9, 0.0)
GMP = {"method": "gmp", "start": 0.05, "end": 0.6, "every": 10, "unit": "fraction"}
# ELSA's level keys of each variant (methods/elsa.py); "top_share": the top level's part of
# the epochs (default 1/2). "default" is ELSA's defaults (admission dense, level_config train,
# rest train) with the recipes' split (5/8) and the dense level at the fine-tuning rate, all
# chosen on validation data (docs/elsa.md).
VARIANTS: dict[str, dict] = {
    "dense-ft": {"admission": "dense", "level_config": "finetune"},
    "dense-train": {"admission": "dense", "level_config": "train"},
    "regrow-ft": {"admission": "regrow", "level_config": "finetune"},
    "regrow-train": {"admission": "regrow", "level_config": "train"},
    "dense-ft-rest-frozen": {"admission": "dense", "level_config": "finetune",
                             "rest": "freeze"},
    "dense-ft-top-quarter": {"admission": "dense", "level_config": "finetune",
                             "top_share": 0.25},
    "dense-train-top-quarter": {"admission": "dense", "level_config": "train",
                                "top_share": 0.25},
    "regrow-train-top-quarter": {"admission": "regrow", "level_config": "train",
                                 "top_share": 0.25},
    "dense-train-top-5of8": {"admission": "dense", "level_config": "train",
                            "top_share": 0.625},
    "dense-train-top-3of4": {"admission": "dense", "level_config": "train",
                            "top_share": 0.75},
    "regrow-train-top-5of8": {"admission": "regrow", "level_config": "train",
                              "top_share": 0.625},
    "regrow-init-train-top-5of8": {"admission": "regrow", "start": "init",
                                   "level_config": "train", "top_share": 0.625},
    "regrow-init-train-top-3of4": {"admission": "regrow", "start": "init",
                                   "level_config": "train", "top_share": 0.75},
    "dense-train-top-5of8-dense-level-ft-rate": {"admission": "dense", "level_config": "train",
                                                 "top_share": 0.625,
                                                 "level_lr": [0.1, 0.1, 0.01]},
    "dense-train-top-5of8-rest-frozen": {"admission": "dense", "level_config": "train",
                                         "top_share": 0.625, "rest": "freeze"},
    "default": {"top_share": 0.625, "level_lr": [0.1, 0.1, 0.01]},  # as the recipes
}


def elsa_method(name: str, variant: dict, epochs: int) -> dict:
    """The ELSA method of ``variant``: GMP to the top level on ``top_share`` of ``epochs``,
    each denser level on an equal share of the rest (any remainder goes to the top)."""
    keys = dict(variant)
    share = round(epochs * (1 - keys.pop("top_share", 0.5))) // (len(LEVELS) - 1)
    top = epochs - share * (len(LEVELS) - 1)
    return {"method": "elsa", "name": name, "levels": list(LEVELS),
            "level_epochs": [share] * (len(LEVELS) - 1),
            "top": {**GMP, "budget": top / epochs}, **keys}


def bench_recipe(dataset: str, model: str, epochs: int, seed: int, variants: list[str],
                 val_size: int, batch_size: int = 64,
                 train_size: int | None = None) -> recipe.Recipe:
    """The comparison as a recipe: each ELSA variant next to GMP at each sparse level."""
    share = epochs // 2 // (len(LEVELS) - 1)
    methods = [elsa_method(f"elsa-{v}", VARIANTS[v], epochs) for v in variants]
    return recipe.from_dict({
        "name": "bench-elsa", "seed": seed,
        "data": {"name": dataset, "val_size": val_size,
                 **({"train_size": train_size} if train_size else {})},
        "model": {"name": model},
        "train": {"epochs": epochs, "batch_size": batch_size, "lr": 0.1,
                  "weight_decay": 0.0001},
        "finetune": {"epochs": share, "batch_size": batch_size, "lr": 0.01,
                     "weight_decay": 0.0001},
        "prune": {"methods": [*methods, {**GMP, "sparsities": list(LEVELS[:-1])}],
                  "sparsities": [LEVELS[0]]},
    })


def compare(results: dict, variant: str) -> list[dict]:
    """One row per level of ``variant``: ELSA's test and validation accuracy, the separate
    model's, the gaps in points (separate minus ELSA)."""
    alone = {r["sparsity"]: r for r in results["runs"] if r["method"] == "gmp"}
    alone[0.0] = {**results["dense"], "actual_sparsity": 0.0}
    rows = []
    for run in (r for r in results["runs"] if r["method"] == f"elsa-{variant}"):
        other = alone[run["sparsity"]]
        rows.append({"variant": variant, "level": run["sparsity"],
                     "elsa": run["accuracy"], "alone": other["accuracy"],
                     "gap_points": 100 * (other["accuracy"] - run["accuracy"]),
                     "elsa_val": run["val_accuracy"], "alone_val": other["val_accuracy"],
                     "val_gap_points": 100 * (other["val_accuracy"] - run["val_accuracy"]),
                     "elsa_sparsity": run["actual_sparsity"],
                     "alone_sparsity": other["actual_sparsity"]})
    return rows


def checkpoint_bytes(out: Path, variant: str) -> dict[str, int]:
    """The nested checkpoint's bytes and the four separate models' (GMP's and the dense one)."""
    separate = [out / "gmp" / f"s{level:g}" / "model.safetensors" for level in LEVELS[:-1]]
    separate.append(out / "dense" / "model.safetensors")
    return {"nested": (out / f"elsa-{variant}" / "nested.safetensors").stat().st_size,
            "separate": sum(p.stat().st_size for p in separate),
            "separate_each": [p.stat().st_size for p in separate]}


def summarise(rows: list[dict]) -> list[dict]:
    """Per variant and level: mean gaps and their range over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["level"]), []).append(row)
    summary = []
    for (variant, level), group in groups.items():
        entry = {"variant": variant, "level": level, "seeds": len(group)}
        for key in ("elsa", "alone", "gap_points", "elsa_val", "alone_val", "val_gap_points"):
            values = [r[key] for r in group]
            entry[key] = statistics.fmean(values)
            if key.endswith("gap_points"):
                entry[f"{key}_min"], entry[f"{key}_max"] = min(values), max(values)
        summary.append(entry)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="lenet300")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", default="default",
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=None,
                        help="a fixed stratified subset of the training examples (default all)")
    parser.add_argument("--val-size", type=int, default=None,
                        help="validation examples (default: 300 digits, 5000 otherwise)")
    parser.add_argument("--name", default="elsa", help="bench/results/<name>.json")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-elsa"))
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    val_size = args.val_size or (300 if args.dataset == "digits" else 5000)
    rows, sizes, start = [], {}, time.perf_counter()
    for seed in args.seeds:
        out = args.out / f"seed{seed}"
        results = experiment.run(bench_recipe(args.dataset, args.model, args.epochs, seed,
                                              variants, val_size, args.batch_size,
                                              args.train_size), out,
                                     progress=False)
        for variant in variants:
            rows += [{**row, "seed": seed} for row in compare(results, variant)]
            sizes.setdefault(variant, checkpoint_bytes(out, variant))
        print(f"seed {seed} done, {time.perf_counter() - start:.0f} s", flush=True)
    summary = summarise(rows)
    print(markdown_table(summary, ["variant", "level", "seeds", "elsa", "alone", "gap_points",
                                   "gap_points_min", "gap_points_max", "val_gap_points",
                                   "val_gap_points_min", "val_gap_points_max"]))
    for variant, size in sizes.items():
        print(f"{variant}: nested checkpoint {size['nested']:,} bytes; four separate "
              f"checkpoints {size['separate']:,} bytes ({size['separate_each']})")
    seconds = time.perf_counter() - start
    print(f"{seconds:.0f} s")
    setting = {"dataset": args.dataset, "model": args.model, "epochs": args.epochs,
               "batch_size": args.batch_size, "train_size": args.train_size,
               "seeds": args.seeds, "val_size": val_size, "seconds": round(seconds),
               "variants": {v: elsa_method(f"elsa-{v}", VARIANTS[v], args.epochs)
                            for v in variants}}
    path = write_results(args.name, [{"setting": setting}, *rows,
                                     *({"summary": s} for s in summary), {"bytes": sizes}])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
