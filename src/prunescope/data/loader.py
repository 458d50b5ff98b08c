"""In-memory batching and batch augmentation.

The datasets are small tensors already in memory, so :class:`Loader` slices them directly (no
``torch.utils.data.DataLoader``, no worker processes). All randomness (shuffling and
augmentation) comes from one ``torch.Generator``, so saving and restoring its state reproduces an
epoch exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from prunescope.data.base import Subset
from prunescope.errors import ConfigError
from prunescope.registry import Registry

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
AUGMENTATIONS: Registry[Augment] = Registry("augmentation")


class Loader:
    """Iterate over ``subset`` in batches of ``(x, y)``.

    With ``shuffle=True`` each ``iter(loader)`` immediately draws a permutation from
    ``generator`` (the global torch generator when ``None``); otherwise examples come in order.
    ``augment(x, generator)`` is applied to every batch with the same generator. The last
    partial batch is dropped when ``drop_last`` is true; ``len(loader)`` is the number of batches.
    """

    def __init__(self, subset: Subset, batch_size: int, *, shuffle: bool,
                 generator: torch.Generator | None = None, augment: Augment | None = None,
                 drop_last: bool = False) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if augment is not None and not callable(augment):
            raise ConfigError(f"augment must be a callable or None, got {augment!r}")
        self.subset = subset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = torch.default_generator if generator is None else generator
        self.augment = augment
        self.drop_last = drop_last

    def __len__(self) -> int:
        n, b = len(self.subset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.subset)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        return self._batches(order)

    def _batches(self, order: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.subset.x, self.subset.y
        for i in range(len(self)):
            lo, hi = i * self.batch_size, (i + 1) * self.batch_size
            if order is None:
                bx, by = x[lo:hi], y[lo:hi]
            else:
                idx = order[lo:hi].to(x.device)
                bx, by = x.index_select(0, idx), y.index_select(0, idx)
            if self.augment is not None:
                bx = self.augment(bx, self.generator)
            yield bx, by


@AUGMENTATIONS.register("crop_flip")
def random_crop_flip(x: torch.Tensor, generator: torch.Generator,
                     padding: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation of a batch ``[N, C, H, W]``; returns a new tensor.

    Each example is zero-padded by ``padding`` on every side (zero is the mean colour, since the
    images are already normalised), cropped back to ``H x W`` at a random offset, and mirrored
    horizontally with probability 1/2. Offsets and flips are drawn from ``generator``, in that
    order, on the CPU.
    """
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ConfigError(f"padding must be a non-negative integer, got {padding!r}")
    n, _, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(0)[None, :], cols[None, :]) + dx[:, None]
    rows = torch.arange(h)[None, :] + dy[:, None]
    padded = F.pad(x, (padding,) * 4).permute(0, 2, 3, 1)  # [N, H+2p, W+2p, C]
    batch = torch.arange(n)[:, None, None]
    dev = x.device
    out = padded[batch.to(dev), rows[:, :, None].to(dev), cols[:, None, :].to(dev)]
    return out.permute(0, 3, 1, 2).contiguous()
