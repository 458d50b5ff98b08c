"""Plain-text tables of experiment results."""

from __future__ import annotations

from typing import Any


def format_results(results: dict[str, Any]) -> str:
    """The dense accuracy and one row per method and sparsity, as a fixed-width table."""
    lines = [f"{results['model']} on {results['dataset']}: dense test accuracy "
             f"{results['dense']['accuracy']:.4f}"]
    if not results["runs"]:
        return lines[0]
    header = (f"{'method':28s} {'sparsity':>8s} {'effective':>9s} {'one-shot':>8s} "
              f"{'accuracy':>9s} {'dense':>7s}")
    lines += ["", header, "-" * len(header)]
    for run in results["runs"]:
        lines.append(
            f"{run['method']:28s} {run['sparsity']:8.3g} {_cell(run, 'effective_sparsity', 9)} "
            f"{_cell(run, 'accuracy_before_finetune', 8)} {run['accuracy']:9.4f} "
            f"{_cell(run, 'dense_accuracy', 7)}"
        )
    notes = ["one-shot: accuracy right after one-shot pruning, before fine-tuning",
             "accuracy: final test accuracy",
             "dense: the method's own dense model (AC/DC's co-trained one, CrAM's before pruning)"]
    return "\n".join([*lines, "", *notes])


def _cell(run: dict[str, Any], key: str, width: int) -> str:
    value = run.get(key)
    return f"{value:{width}.4f}" if value is not None else f"{'-':>{width}s}"
