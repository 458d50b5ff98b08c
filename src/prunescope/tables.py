"""Plain-text tables of experiment results."""

from __future__ import annotations

from typing import Any


def format_results(results: dict[str, Any]) -> str:
    """The dense accuracy and one row per method and sparsity, as a fixed-width table."""
    lines = [f"{results['model']} on {results['dataset']}: dense test accuracy "
             f"{results['dense']['accuracy']:.4f}"]
    if not results["runs"]:
        return lines[0]
    header = f"{'method':28s} {'sparsity':>8s} {'effective':>9s} {'one-shot':>8s} {'finetuned':>9s}"
    lines += ["", header, "-" * len(header)]
    for run in results["runs"]:
        lines.append(
            f"{run['method']:28s} {run['sparsity']:8.2f} {run['effective_sparsity']:9.4f} "
            f"{run['accuracy_before_finetune']:8.4f} {run['accuracy']:9.4f}"
        )
    return "\n".join(lines)
