"""An explanation as files: one PNG per map, an overview PNG, an HTML page and a JSON summary.

``out/index.html`` shows the input and, per saliency method, the map on the original network
beside the map on the SPADE trace (the PNGs next to it); ``out/overview.png`` is the same grid
in one image; ``out/explanation.json`` holds the predictions, timings and settings.
"""

from __future__ import annotations

import html
import io
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from prunescope.files import atomic_write_bytes, write_json  # noqa: E402
from prunescope.spade.trace import Explanation  # noqa: E402

NETWORKS = (("original", "original network"), ("spade", "SPADE trace"))
Display = Callable[[torch.Tensor], torch.Tensor]


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def _picture(image: torch.Tensor, display: Display) -> torch.Tensor:
    """``[H, W]`` or ``[H, W, 3]`` in [0, 1] for imshow (2 channels: red and green, blue 0)."""
    pixels = display(image).clamp(0, 1)
    if pixels.shape[0] == 1:
        return pixels[0]
    rgb = torch.zeros((3, *pixels.shape[1:]), dtype=pixels.dtype)
    rgb[:min(3, pixels.shape[0])] = pixels[:3]
    return rgb.permute(1, 2, 0)


def _heat(saliency: torch.Tensor) -> torch.Tensor:
    """``|map|`` summed over channels, scaled to [0, 1]."""
    heat = saliency.abs().sum(0)
    return heat / heat.max() if heat.max() > 0 else heat


def _single(picture: torch.Tensor, cmap: str | None) -> bytes:
    figure, axis = plt.subplots(figsize=(2.4, 2.4))
    axis.imshow(picture.numpy(), cmap=cmap, vmin=0, vmax=1)
    axis.axis("off")
    return _png(figure)


def _overview(explanation: Explanation, display: Display) -> bytes:
    methods = list(explanation.maps)
    figure, axes = plt.subplots(len(methods), 3, figsize=(7, 2.3 * len(methods)), squeeze=False)
    for row, method in enumerate(methods):
        axes[row][0].imshow(_picture(explanation.image, display).numpy(), cmap="gray")
        axes[row][0].set_ylabel(method)
        for column, (key, title) in enumerate(NETWORKS, 1):
            axes[row][column].imshow(_heat(explanation.maps[method][key]).numpy(), cmap="inferno")
            axes[row][column].set_title(title if row == 0 else "")
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    return _png(figure)


def summary(explanation: Explanation, classes: tuple[str, ...] | None = None) -> dict:
    """Predictions, timings and settings of an explanation (JSON-ready)."""
    def name(index: int) -> str:
        return classes[index] if classes else str(index)

    networks = {key: {"prediction": name(explanation.prediction(key)),
                      "probability_of_target": float(explanation.probabilities[key][
                          explanation.target])} for key, _ in NETWORKS}
    return {"target": name(explanation.target), "networks": networks,
            "trace_sparsity": explanation.mask.sparsity, "seconds": explanation.seconds,
            "methods": list(explanation.maps), "config": asdict(explanation.config)}


def write_report(explanation: Explanation, out: str | Path, *, display: Display | None = None,
                 classes: tuple[str, ...] | None = None, title: str = "SPADE explanation"
                 ) -> Path:
    """Write the PNGs, ``index.html`` and ``explanation.json`` into ``out``; returns the page.

    ``display`` maps the (normalised) input to pixels in [0, 1] for showing it (default: scale
    its range to [0, 1]); ``classes`` names the outputs.
    """
    out = Path(out)
    display = display or (lambda x: (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12))
    gray = explanation.image.shape[0] == 1
    atomic_write_bytes(out / "input.png", _single(_picture(explanation.image, display),
                                                  "gray" if gray else None))
    for method, maps in explanation.maps.items():
        for key, _ in NETWORKS:
            atomic_write_bytes(out / f"{method}-{key}.png", _single(_heat(maps[key]), "inferno"))
    atomic_write_bytes(out / "overview.png", _overview(explanation, display))
    info = summary(explanation, classes)
    write_json(out / "explanation.json", info)
    atomic_write_bytes(out / "index.html", _page(info, title).encode())
    return out / "index.html"


def _page(info: dict, title: str) -> str:
    networks = info["networks"]
    heads = "".join(f"<th>{html.escape(t)}<br><small>predicts {networks[k]['prediction']}, "
                    f"p(target) = {networks[k]['probability_of_target']:.3f}</small></th>"
                    for k, t in NETWORKS)
    rows = "".join(
        f"<tr><th>{html.escape(m)}</th>"
        + "".join(f'<td><img src="{html.escape(m)}-{k}.png" alt="{html.escape(m)} {k}"></td>'
                  for k, _ in NETWORKS) + "</tr>" for m in info["methods"])
    seconds = sum(info["seconds"].values())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:4px;text-align:center}}
img{{width:200px;image-rendering:pixelated}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p><img src="input.png" alt="input"><br>explained class: <b>{html.escape(info['target'])}</b>;
trace sparsity {info['trace_sparsity']:.3f}; {seconds:.2f} s.</p>
<p>Saliency maps (|attribution|, brighter = more salient) on the original network and on its
SPADE trace: a copy pruned layer-wise on augmentations of this input (Soltani Moakhar et al.,
ICML 2024).</p>
<table><tr><th>method</th>{heads}</tr>{rows}</table>
</body></html>
"""
