"""Plots of experiment results (matplotlib, written as PNG without a display)."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from prunescope.files import atomic_write_bytes  # noqa: E402

PANELS = (("accuracy", "test accuracy (after fine-tuning or sparse training)"),
          ("accuracy_before_finetune", "test accuracy before fine-tuning (one-shot)"),
          ("effective_sparsity", "effective vs direct compression"))


def _compression(sparsity: float) -> float:
    return 1.0 / (1.0 - sparsity)


def plot_accuracy_vs_sparsity(results: dict[str, Any], path: str | Path) -> None:
    """Three panels against sparsity (log-compression axis): final test accuracy, one-shot
    accuracy before fine-tuning (one-shot methods only), and effective compression (log scale,
    so weights cut off from every input-output path show as a rise above the diagonal); one
    line per method.

    The fine-tuned panel is zoomed to the methods that still learn; a run below its floor is
    drawn on the floor with a downward triangle.
    """
    by_method: dict[str, list[dict]] = defaultdict(list)
    for run in results["runs"]:
        by_method[run["method"]].append(run)
    sparsities = sorted({run["sparsity"] for run in results["runs"]})
    dense = results["dense"]["accuracy"]
    floor = _accuracy_floor(results["runs"])
    figure, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    for axis, (key, title) in zip(axes, PANELS, strict=True):
        low = floor if key == "accuracy" else None
        for method, runs in by_method.items():
            runs = sorted((r for r in runs if r.get(key) is not None), key=lambda r: r["sparsity"])
            if runs:
                _plot_method(axis, runs, key, method, low)
        if not axis.lines:
            axis.text(0.5, 0.5, "no one-shot runs", ha="center", va="center",
                      transform=axis.transAxes, color="gray")
        _sparsity_axis(axis, sparsities, title)
    for axis in axes[:2]:
        axis.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense {dense:.4f}")
        axis.set_ylabel("test accuracy")
    axes[0].set_ylim(floor - 0.003, min(1.0, dense + 0.01))
    axes[2].plot([_compression(s) for s in sparsities], [_compression(s) for s in sparsities],
                 color="black", linestyle="--", linewidth=1, label="effective = direct")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("effective compression 1/(1-s), log scale")
    axes[0].legend(fontsize=8, loc="lower left")
    axes[2].legend(fontsize=8, loc="upper left")
    figure.suptitle(f"{results['model']} on {results['dataset']}: accuracy and connectivity "
                    "against sparsity")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def _plot_method(axis, runs: list[dict], key: str, label: str, floor: float | None) -> None:
    xs = [_compression(r["sparsity"]) for r in runs]
    ys = [r[key] for r in runs]
    if key == "effective_sparsity":
        ys = [_compression(min(y, 1 - 1e-9)) for y in ys]
    if floor is None:
        axis.plot(xs, ys, marker="o", markersize=4, label=label)
        return
    shown = [max(y, floor) for y in ys]
    (line,) = axis.plot(xs, shown, marker="o", markersize=4, label=label)
    clipped = [(x, floor) for x, y in zip(xs, ys, strict=True) if y < floor]
    if clipped:
        axis.plot(*zip(*clipped, strict=True), linestyle="none", marker="v", markersize=8,
                  color=line.get_color())


def _sparsity_axis(axis, sparsities: list[float], title: str) -> None:
    axis.set_title(title)
    axis.set_xscale("log")
    low, high = _compression(min(sparsities)), _compression(max(sparsities))
    axis.set_xlim(low / 1.25, high * 1.25)
    axis.set_xticks([_compression(s) for s in sparsities])
    axis.set_xticklabels([f"{s:g}" for s in sparsities])
    axis.minorticks_off()
    axis.set_xlabel("sparsity (axis: log of compression 1/(1-s))")
    axis.grid(alpha=0.3)


def _accuracy_floor(runs: list[dict]) -> float:
    """A little below the worst fine-tuned accuracy that is clearly above chance."""
    learning = [r["accuracy"] for r in runs if r["accuracy"] > 0.5]
    return max(0.0, min(learning, default=0.0) - 0.01)
