"""``prunescope explain``: a SPADE explanation of one input to a checkpoint, written as a page.

The input is an example of the checkpoint's own dataset (``test:17``, ``val:3``, ``train:0``),
a PNG/JPEG image or a ``.npy`` array of pixels in [0, 1] (``[H, W]``, ``[H, W, C]`` or
``[C, H, W]``); files are normalised like the dataset. An input whose size differs from the
model's is refused (no silent resizing).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunescope.commands import load_checkpoint
from prunescope.data import Splits
from prunescope.errors import ConfigError
from prunescope.spade.report import summary, write_report
from prunescope.spade.trace import DEFAULT_METHODS, SpadeConfig, explain

_EXAMPLE = re.compile(r"^(train|val|test):(\d+)$")


def read_input(spec: str, splits: Splits) -> tuple[torch.Tensor, str]:
    """The normalised input ``[C, H, W]`` named by ``spec``, and a short description of it."""
    if match := _EXAMPLE.match(spec):
        subset, index = getattr(splits, match[1]), int(match[2])
        if index >= len(subset):
            raise ConfigError(f"--input {spec}: the {match[1]} split has {len(subset)} examples")
        return subset.x[index], f"{match[1]} example {index} (label {subset.y[index].item()})"
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--input {spec!r} is neither a file nor 'test:N' / 'val:N' / 'train:N'")
    channels = splits.input_shape[0]
    pixels = _match_channels(_read_pixels(path, channels), channels)
    mean = torch.tensor(splits.mean).view(-1, 1, 1)
    std = torch.tensor(splits.std).view(-1, 1, 1)
    return ((pixels - mean) / std).float(), path.name


def _match_channels(pixels: torch.Tensor, channels: int) -> torch.Tensor:
    """The image's colour channels as the model's: alpha dropped, grey repeated, colour averaged
    for a grey model, extra colour channels dropped (2-channel Colored MNIST keeps red, green)."""
    if pixels.shape[0] in (2, 4) and pixels.shape[0] != channels:
        pixels = pixels[:-1]  # luminance+alpha or RGBA: drop alpha
    if pixels.shape[0] == channels:
        return pixels
    if channels == 1:
        return pixels.mean(0, keepdim=True)
    if pixels.shape[0] == 1:
        return pixels.expand(channels, -1, -1)
    if pixels.shape[0] > channels:
        return pixels[:channels]
    raise ConfigError(f"the input has {pixels.shape[0]} channels but the model takes {channels}")


def _read_pixels(path: Path, channels: int) -> torch.Tensor:
    """Pixels in [0, 1] as ``[C, H, W]`` from an image or ``.npy`` file (a 3-d array is
    channels-first when its first dimension is the model's channel count, else HWC)."""
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ConfigError(f"{path} is not a plain numpy array: {exc}") from None
        pixels = torch.from_numpy(np.asarray(array, dtype=np.float32))
        if pixels.dim() == 3 and pixels.shape[0] != channels and pixels.shape[-1] in (
                channels, 1, 3, 4):
            pixels = pixels.permute(2, 0, 1)
    elif path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        from matplotlib import image

        array = np.asarray(image.imread(path), dtype=np.float32)
        pixels = torch.from_numpy(array / 255.0 if array.max() > 1 else array)
        pixels = pixels.permute(2, 0, 1) if pixels.dim() == 3 else pixels
    else:
        raise ConfigError(f"--input {path}: use a .png, .jpg or .npy file, or 'test:N'")
    if pixels.dim() == 2:
        pixels = pixels.unsqueeze(0)
    if pixels.dim() != 3:
        raise ConfigError(f"--input {path} has shape {list(pixels.shape)}; give one image")
    return pixels


def explain_checkpoint(checkpoint: Path, spec: str, out: Path, *, config: SpadeConfig,
                       methods: Sequence[str] = DEFAULT_METHODS, target: int | None = None,
                       data_root: str | None = None) -> dict[str, Any]:
    """Explain input ``spec`` to the model in ``checkpoint``; writes ``out/index.html`` etc."""
    model, _, _, splits = load_checkpoint(checkpoint, data_root)
    image, described = read_input(spec, splits)
    black = -torch.tensor(splits.mean).view(-1, 1, 1) / torch.tensor(splits.std).view(-1, 1, 1)
    explanation = explain(model, image, methods=methods, target=target, baseline=black,
                          config=config)
    page = write_report(explanation, out, display=splits.unnormalise, classes=splits.classes,
                        title=f"SPADE: {described}")
    return {**summary(explanation, splits.classes), "input": described, "page": str(page)}


def config_from(sparsity: float | None, augmentations: int | None, sequential: bool | None
                ) -> SpadeConfig:
    """SpadeConfig defaults with the command line's overrides."""
    config = SpadeConfig()
    if sparsity is not None:
        config = dataclasses.replace(config, sparsity=sparsity)
    if augmentations is not None:
        config = dataclasses.replace(config, augmentations=dataclasses.replace(
            config.augmentations, count=augmentations))
    if sequential is not None:
        config = dataclasses.replace(config, sequential=sequential)
    return config
