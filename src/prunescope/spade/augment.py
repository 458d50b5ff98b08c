"""Augmentations of one image: the batch SPADE prunes on.

SPADE (Soltani Moakhar, Iofinova, Frantar & Alistarh, ICML 2024, Algorithm 1) fills a batch
with random augmentations of the sample and prunes each layer to reproduce its outputs on that
batch. The batch here is the image itself followed by small random affine transforms (shift,
rotation, scale; the border pixels are repeated into the space uncovered), optional horizontal
flips, and (off by default) additive Gaussian noise: the sample's own neighbourhood, so the
pruned network keeps the connections the sample uses. Without noise, pixels that stay constant
over the batch (an image's background) give the reconstruction nothing to keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentations:
    """How to draw the batch: ``count`` images (the first is the sample itself); shifts up to
    ``shift`` pixels, rotations up to ``rotate`` degrees, scale within ``1 +- scale``, noise of
    standard deviation ``noise`` (in the input's units), horizontal flips when ``flip``."""

    count: int = 64
    shift: float = 2.0
    rotate: float = 10.0
    scale: float = 0.1
    noise: float = 0.0
    flip: bool = False

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``[count, C, H, W]`` augmentations of ``image`` ``[C, H, W]``."""
        n = self.count - 1
        batch = image.unsqueeze(0).expand(n, *image.shape)
        if n > 0:
            grid = F.affine_grid(self._affine(n, image.shape[-2:], generator), list(batch.shape),
                                 align_corners=False)
            batch = F.grid_sample(batch, grid, padding_mode="border", align_corners=False)
            if self.flip:
                flips = torch.rand(n, generator=generator) < 0.5
                batch = torch.where(flips.view(-1, 1, 1, 1), batch.flip(-1), batch)
            batch = batch + self.noise * torch.randn(batch.shape, generator=generator)
        return torch.cat([image.unsqueeze(0), batch.to(image.dtype)])

    def _affine(self, n: int, size: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """Random ``[n, 2, 3]`` affine matrices in normalised coordinates."""
        def uniform(bound: float) -> torch.Tensor:
            return (torch.rand(n, generator=generator) * 2 - 1) * bound

        angle = uniform(math.radians(self.rotate))
        zoom = 1 + uniform(self.scale)
        height, width = size
        dx, dy = uniform(2 * self.shift / width), uniform(2 * self.shift / height)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        return torch.stack([torch.stack([cos, -sin, dx], 1), torch.stack([sin, cos, dy], 1)], 1)
