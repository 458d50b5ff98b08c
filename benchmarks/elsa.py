"""ELSA benchmark: each level of one nested model against a model trained for that level alone.

One recipe, run through the experiment stages: the dense model (``--epochs`` epochs; also the
dense level's comparison and the source of ELSA's admission magnitudes), ELSA with GMP to the
sparsest level in half the epochs and the other half split evenly over the denser levels, and
GMP trained separately for each sparse level with the same total epochs. Prints a table, the
bytes of the nested checkpoint against the four separate ones, and writes
bench/results/elsa.json. Defaults: lenet300 on the bundled digits (a short CPU run); pass
``--dataset mnist`` where an epoch of MNIST is affordable.

    .venv/bin/python benchmarks/elsa.py [--dataset digits] [--epochs 24] [--out runs/bench-elsa]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import markdown_table, write_results

from prunescope import experiment, recipe

LEVELS = (0.98, 0.95, 0.9, 0.0)


def bench_recipe(dataset: str, epochs: int) -> recipe.Recipe:
    """The comparison as a recipe: elsa (its top level on half the epochs, each later level on
    an equal share of the other half) next to gmp at each sparse level on all of them."""
    share = epochs // 2 // (len(LEVELS) - 1)
    top = epochs - share * (len(LEVELS) - 1)
    gmp = {"method": "gmp", "start": 0.05, "end": 0.6, "every": 10, "unit": "fraction"}
    elsa = {"method": "elsa", "levels": list(LEVELS), "level_epochs": [share] * (len(LEVELS) - 1),
            "top": {**gmp, "budget": top / epochs}}
    return recipe.from_dict({
        "name": "bench-elsa", "seed": 0,
        "data": {"name": dataset, "val_size": 100 if dataset == "digits" else 5000},
        "model": {"name": "lenet300"},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.1, "weight_decay": 0.0001},
        "finetune": {"epochs": share, "batch_size": 64, "lr": 0.01, "weight_decay": 0.0001},
        "prune": {"methods": [elsa, {**gmp, "sparsities": list(LEVELS[:-1])}],
                  "sparsities": [LEVELS[0]]},
    })


def compare(results: dict) -> list[dict]:
    """One row per level: ELSA's accuracy, the separate model's, the gap in points."""
    alone = {r["sparsity"]: r for r in results["runs"] if r["method"] == "gmp"}
    alone[0.0] = {**results["dense"], "actual_sparsity": 0.0}
    rows = []
    for run in (r for r in results["runs"] if r["method"] == "elsa"):
        other = alone[run["sparsity"]]
        rows.append({"level": run["sparsity"], "elsa": run["accuracy"],
                     "alone": other["accuracy"],
                     "gap_points": 100 * (other["accuracy"] - run["accuracy"]),
                     "elsa_sparsity": run["actual_sparsity"],
                     "alone_sparsity": other["actual_sparsity"]})
    return rows


def checkpoint_bytes(out: Path) -> dict[str, int]:
    """The nested checkpoint's bytes and the four separate models' (GMP's and the dense one)."""
    separate = [out / "gmp" / f"s{level:g}" / "model.safetensors" for level in LEVELS[:-1]]
    separate.append(out / "dense" / "model.safetensors")
    return {"nested": (out / "elsa" / "nested.safetensors").stat().st_size,
            "separate": sum(p.stat().st_size for p in separate)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-elsa"))
    args = parser.parse_args()
    start = time.perf_counter()
    results = experiment.run(bench_recipe(args.dataset, args.epochs), args.out, progress=False)
    rows = compare(results)
    sizes = checkpoint_bytes(args.out)
    print(markdown_table(rows, ["level", "elsa", "alone", "gap_points", "elsa_sparsity"]))
    print(f"nested checkpoint {sizes['nested']:,} bytes; four separate checkpoints "
          f"{sizes['separate']:,} bytes; {time.perf_counter() - start:.0f} s")
    path = write_results("elsa", [{**row, "dataset": args.dataset, "epochs": args.epochs}
                                  for row in rows] + [{"bytes": sizes}])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
