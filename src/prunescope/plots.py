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
    """Three panels against sparsity (log-compression axis): test accuracy of the runs trained
    after (or while) pruning, one-shot accuracy with no training after pruning (one-shot methods
    before fine-tuning, and runs marked ``finetuned: false`` such as CrAM's), and effective
    compression (log scale, so weights cut off from every input-output path show as a rise above
    the diagonal); one line per method.

    The trained panel is zoomed to the methods that still learn; a run below its floor is
    drawn on the floor with a downward triangle.
    """
    by_method: dict[str, list[dict]] = defaultdict(list)
    for run in results["runs"]:
        by_method[run["method"]].append(run)
    sparsities = sorted({run["sparsity"] for run in results["runs"]})
    dense = results["dense"]["accuracy"]
    floor = _accuracy_floor([r for r in results["runs"] if r.get("finetuned", True)])
    palette = plt.get_cmap("tab10" if len(by_method) <= 10 else "tab20")
    colors = {method: palette(i % palette.N) for i, method in enumerate(by_method)}
    figure, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    for axis, (key, title) in zip(axes, PANELS, strict=True):
        low = floor if key == "accuracy" else None
        for method, runs in by_method.items():
            points = sorted((r["sparsity"], value) for r in runs
                             if (value := _panel_value(r, key)) is not None)
            if points:
                _plot_method(axis, points, key, method, low, colors[method])
        if not axis.lines:
            empty = "no trained runs" if key == "accuracy" else "no one-shot runs"
            axis.text(0.5, 0.5, empty, ha="center", va="center",
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
    for axis in axes[:2]:
        axis.legend(fontsize=8, loc="lower left")
    axes[2].legend(fontsize=8, loc="upper left")
    figure.suptitle(f"{results['model']} on {results['dataset']}: accuracy and connectivity "
                    "against sparsity")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def _panel_value(run: dict, key: str) -> float | None:
    """What ``run`` shows in the panel of ``key`` (None: not in that panel)."""
    trained = run.get("finetuned", True)
    if key == "accuracy":
        return run["accuracy"] if trained else None
    if key == "accuracy_before_finetune":
        return run.get(key, None if trained else run["accuracy"])
    return run.get(key)


def _plot_method(axis, points: list[tuple[float, float]], key: str, label: str,
                 floor: float | None, color) -> None:
    xs = [_compression(sparsity) for sparsity, _ in points]
    ys = [value for _, value in points]
    if key == "effective_sparsity":
        ys = [_compression(min(y, 1 - 1e-9)) for y in ys]
    if floor is None:
        axis.plot(xs, ys, marker="o", markersize=4, label=label, color=color)
        return
    shown = [max(y, floor) for y in ys]
    (line,) = axis.plot(xs, shown, marker="o", markersize=4, label=label, color=color)
    clipped = [(x, floor) for x, y in zip(xs, ys, strict=True) if y < floor]
    if clipped:
        axis.plot(*zip(*clipped, strict=True), linestyle="none", marker="v", markersize=8,
                  color=line.get_color())


def _sparsity_axis(axis, sparsities: list[float], title: str) -> None:
    axis.set_title(title)
    low, high = _compression(min(sparsities)), _compression(max(sparsities))
    axis.set_xlim(low / 1.25, high * 1.25)
    axis.set_xscale("log")
    axis.set_xticks([_compression(s) for s in sparsities])
    axis.set_xticklabels([f"{s:g}" for s in sparsities])
    axis.minorticks_off()
    axis.set_xlabel("sparsity (axis: log of compression 1/(1-s))")
    axis.grid(alpha=0.3)


def _accuracy_floor(runs: list[dict]) -> float:
    """A little below the worst fine-tuned accuracy that is clearly above chance."""
    learning = [r["accuracy"] for r in runs if r["accuracy"] > 0.5]
    return max(0.0, min(learning, default=0.0) - 0.01)
