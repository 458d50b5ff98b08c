"""The report's figures: matplotlib (Agg) drawings returned as PNG data URIs.

Each function takes the typed :class:`~prunescope.audit.schema.AuditResult` and returns
``"data:image/png;base64,..."``, or None when the audit has nothing to draw for it.
"""

from __future__ import annotations

import base64
import io
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from prunescope.audit.schema import AuditResult, PopulationAudit  # noqa: E402

DPI = 100
SIGNAL_NAMES = {"margin": "small margin", "entropy": "entropy", "loss": "loss",
                "el2n": "EL2N error norm", "dense_uncertain": "uncertain (p<0.9)",
                "dense_incorrect": "incorrect", "dense_disagreement": "dense disagreement"}


def to_uri(figure) -> str:
    """Render and close ``figure``; its PNG as a data URI."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _by_method(result: AuditResult) -> dict[str, list[PopulationAudit]]:
    methods: dict[str, list[PopulationAudit]] = defaultdict(list)
    for block in result.populations:
        methods[block.method].append(block)
    return {m: sorted(b, key=lambda b: b.sparsity) for m, b in methods.items()}


def _compression(sparsity: float | None) -> float:
    return 1.0 / (1.0 - min(float(sparsity or 0.0), 1 - 1e-6))


def accuracy_figure(result: AuditResult) -> str:
    """Accuracy against direct and against effective sparsity, one line per method, with
    intervals; runs far below the rest are drawn on the floor with a downward triangle."""
    methods = _by_method(result)
    dense = result.dense.accuracy
    means = [b.accuracy.mean for b in result.populations]
    floor = max(0.0, min([m for m in means if m > 0.5] or [0.0]) - 0.02)
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    for axis, key, title in ((axes[0], "direct_sparsity", "direct sparsity"),
                             (axes[1], "effective_sparsity", "effective sparsity")):
        for method, blocks in methods.items():
            _accuracy_line(axis, blocks, key, method, floor)
        axis.axhspan(*dense.interval, color="black", alpha=0.08)
        axis.axhline(dense.mean, color="black", linestyle="--", linewidth=1,
                     label=f"dense {dense.mean:.4f}")
        values = [getattr(b, key) or 0.0 for b in result.populations]
        ticks = _ticks(values, [b.sparsity or 0.0 for b in result.populations])
        axis.set_xlim(_compression(min(values)) / 1.15, _compression(max(values)) * 1.15)
        axis.set_xscale("log")
        axis.set_xticks([_compression(t) for t in ticks])
        axis.set_xticklabels([f"{t:g}" for t in ticks], rotation=45)
        axis.minorticks_off()
        axis.set_xlabel(f"{title} (log of compression 1/(1-s))")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"{result.dataset.split} accuracy")
    axes[0].set_ylim(floor - 0.005, min(1.0, dense.max + 0.01))
    axes[0].legend(fontsize=8, loc="lower left")
    return to_uri(figure)


def _ticks(values: list[float], nominal: list[float]) -> list[float]:
    """The nominal sparsities, plus round ones up to the largest value (effective sparsity can
    run past the grid), never two closer than a fifth of a decade of compression."""
    extra = [0.995, 0.998, 0.999, 0.9995, 0.9999]
    candidates = sorted({round(t, 4) for t in nominal} | {t for t in extra if t <= max(values)})
    chosen: list[float] = []
    for tick in candidates:
        if min(values) - 1e-9 <= tick <= max(values) + 1e-9 and (
                not chosen or np.log10(_compression(tick) / _compression(chosen[-1])) > 0.2):
            chosen.append(tick)
    return chosen or [min(values)]


def _accuracy_line(axis, blocks: list[PopulationAudit], key: str, label: str,
                   floor: float) -> None:
    xs = [_compression(getattr(b, key)) for b in blocks]
    ys = [max(b.accuracy.mean, floor) for b in blocks]
    low = [max(y - max(b.accuracy.interval[0], floor), 0)
           for y, b in zip(ys, blocks, strict=True)]
    high = [max(max(b.accuracy.interval[1], floor) - y, 0)
            for y, b in zip(ys, blocks, strict=True)]
    line = axis.errorbar(xs, ys, yerr=[low, high], marker="o", markersize=4, capsize=3,
                         label=label)
    clipped = [(x, floor) for x, b in zip(xs, blocks, strict=True) if b.accuracy.mean < floor]
    if clipped:
        axis.plot(*zip(*clipped, strict=True), linestyle="none", marker="v", markersize=8,
                  color=line[0].get_color())


def heatmap_figure(result: AuditResult) -> str | None:
    """Class x sparsity heatmaps of the normalised recall change, one panel per method."""
    methods = {m: b for m, b in _by_method(result).items() if b}
    if not methods:
        return None
    classes = result.dataset.classes
    values = np.array([v for bs in methods.values() for b in bs
                       for v in _change(b) if v is not None])
    limit = max(float(np.percentile(np.abs(values), 95)) if values.size else 0.01, 1e-3)
    columns = min(4, len(methods))
    rows = -(-len(methods) // columns)
    width = max(3.2, 0.45 * max(len(bs) for bs in methods.values()) + 1.6)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, 0.32 * len(classes)
                                                        * rows + 1.2 * rows), squeeze=False)
    image = None
    for axis, (method, blocks) in zip(axes.flat, methods.items(), strict=False):
        grid = np.array([[np.nan if v is None else 100 * v for v in _change(b)]
                         for b in blocks]).T
        image = axis.imshow(grid, cmap="RdBu", vmin=-100 * limit, vmax=100 * limit,
                            aspect="auto")
        axis.set_title(method, fontsize=9)
        axis.set_xticks(range(len(blocks)))
        axis.set_xticklabels([f"{b.sparsity:g}" for b in blocks], fontsize=7, rotation=45)
        axis.set_yticks(range(len(classes)))
        axis.set_yticklabels(classes if len(classes) <= 20 else [""] * len(classes), fontsize=7)
        if grid.size <= 80:
            for (r, c), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    axis.text(c, r, f"{v:.1f}", ha="center", va="center", fontsize=6,
                              color="white" if abs(v) > 60 * limit else "black")
    for axis in list(axes.flat)[len(methods):]:
        axis.axis("off")
    figure.colorbar(image, ax=axes, shrink=0.8, label="recall change - accuracy change (points)")
    return to_uri(figure)


def _change(block: PopulationAudit) -> list[float | None]:
    """The normalised recall change per class (None where the audit has none)."""
    return block.normalised_change or [None] * len(block.recall)


def cie_counts_figure(result: AuditResult) -> str | None:
    """CIEs per true class for the focus populations (grouped bars)."""
    focus = result.focus_populations()
    if not focus:
        return None
    classes = result.dataset.classes
    figure, axis = plt.subplots(figsize=(min(13, 2 + 0.6 * len(classes) * len(focus) / 2), 3.6))
    width = 0.8 / len(focus)
    for i, block in enumerate(focus):
        xs = np.arange(len(classes)) + (i - (len(focus) - 1) / 2) * width
        axis.bar(xs, block.cie.per_class, width, label=f"{block.label} ({block.cie.count} CIEs)")
    axis.set_xticks(range(len(classes)))
    axis.set_xticklabels(classes)
    axis.set_xlabel("true class")
    axis.set_ylabel("CIEs")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, axis="y")
    return to_uri(figure)


def cie_grid_figure(result: AuditResult, label: str) -> str | None:
    """Images of one focus population's CIEs, titled with the true label and both modal labels
    (green: the dense population was right); ``images`` is plain JSON, read by key."""
    entry = (result.images or {}).get(label)
    if not entry or "pixels" not in entry:  # none, or texts (the page lists those)
        return None
    shape = entry["shape"]
    pixels = np.frombuffer(base64.b64decode(entry["pixels"]), dtype=np.uint8).reshape(shape)
    classes = result.dataset.classes
    columns = min(8, shape[0])
    rows = -(-shape[0] // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.45 * columns, 1.7 * rows),
                                squeeze=False)
    for i, axis in enumerate(axes.flat):
        axis.axis("off")
        if i >= shape[0]:
            continue
        axis.imshow(_displayable(pixels[i]), cmap="gray" if shape[1] == 1 else None,
                    vmin=0, vmax=255)
        true, dense, comp = (entry[k][i] for k in ("labels", "dense_modal", "compressed_modal"))
        axis.set_title(f"y={classes[true]} d={classes[dense]}\nc={classes[comp]}", fontsize=8,
                       color="darkgreen" if dense == true else "firebrick")
    return to_uri(figure)


def _displayable(image: np.ndarray) -> np.ndarray:
    """``[C, H, W]`` uint8 -> what imshow takes (gray, or RGB with missing channels black)."""
    if image.shape[0] == 1:
        return image[0]
    rgb = np.zeros((*image.shape[1:], 3), dtype=np.uint8)
    rgb[..., :min(3, image.shape[0])] = np.moveaxis(image[:3], 0, -1)
    return rgb


def reliability_figure(result: AuditResult) -> str:
    """Reliability diagrams (max-probability vs accuracy) of the dense and focus populations."""
    blocks = [result.dense, *result.focus_populations()]
    figure, axes = plt.subplots(1, len(blocks), figsize=(3.3 * len(blocks), 3.4), squeeze=False)
    for axis, block in zip(axes[0], blocks, strict=True):
        curve = block.reliability
        axis.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
        axis.plot(curve.confidence if curve else [], curve.accuracy if curve else [],
                  marker="o", markersize=4)
        ece = block.values.get("ece")
        ece = "-" if ece is None else f"{ece:.4f}"
        axis.set_title(f"{block.label}\nECE {ece}", fontsize=9)
        axis.set_xlabel("confidence (max probability)")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    return to_uri(figure)


def layers_figure(result: AuditResult) -> str | None:
    """Per-layer direct and effective sparsity of the focus populations' first models (the
    ``cost`` record is plain JSON, read by key)."""
    blocks = [b for b in result.focus_populations() if b.models[0].cost]
    if not blocks:
        return None
    figure, axes = plt.subplots(1, len(blocks), figsize=(4.2 * len(blocks), 3.6), squeeze=False,
                                sharey=True)
    for axis, block in zip(axes[0], blocks, strict=True):
        layers = block.models[0].cost["layers"]
        xs = np.arange(len(layers))
        axis.bar(xs - 0.2, [layer["direct"] for layer in layers], 0.4, label="direct")
        if all(layer["effective"] is not None for layer in layers):
            axis.bar(xs + 0.2, [layer["effective"] for layer in layers], 0.4,
                     label="effective", hatch="//", alpha=0.8)
        axis.set_xticks(xs)
        axis.set_xticklabels([layer["name"].removesuffix(".weight") for layer in layers],
                             rotation=45, ha="right", fontsize=7)
        axis.set_title(block.label, fontsize=9)
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("sparsity")
    axes[0][0].legend(fontsize=8, loc="lower left")
    return to_uri(figure)


def roc_figure(result: AuditResult, target: str = "cie") -> str | None:
    """ROC curves of the dense-model risk signals predicting ``target`` ("cie" or "flip")."""
    panels = [(b.label, getattr(b.risk, target)) for b in result.focus_populations()
              if b.risk and any(score.roc for score in getattr(b.risk, target).values())]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for axis, (label, scores) in zip(axes[0], panels, strict=True):
        for name, score in scores.items():
            if score.roc:
                axis.plot(score.roc.fpr, score.roc.tpr, linewidth=1.3,
                          label=f"{SIGNAL_NAMES.get(name, name)} {score.auroc:.3f}")
        axis.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
        positives = (scores.get("margin") or next(iter(scores.values()))).positives
        axis.set_title(f"{label}: {positives} "
                       f"{'CIEs' if target == 'cie' else 'flipped'}", fontsize=9)
        axis.set_xlabel("false positive rate")
        axis.legend(fontsize=7, loc="lower right", title="signal, AUROC", title_fontsize=7)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("true positive rate")
    return to_uri(figure)
