"""Patterns: which weights fill a tensor's kept count.

A pattern turns a tensor's scores and a count into a bool mask (True = keep):

- ``unstructured``: the ``count`` highest scores; ties go to the lower flat index, so the result
  is exact and deterministic.
- ``N:M`` (e.g. ``2:4``): in every group of M consecutive weights along the input dimension
  (dim 1: Linear in-features, Conv in-channels at each kernel position) keep the N highest
  (Mishra et al. 2021, NVIDIA Ampere sparsity). It fixes the tensor's density at N/M, so the
  count is not used; the input dimension must be divisible by M.
- ``block:RxC`` (e.g. ``block:1x4``): the weight viewed as a matrix ``[out, in * kernel]`` is
  tiled by R x C blocks ranked by their mean score; ``round(count / (R*C))`` blocks are kept.
  R and C must divide the matrix.

**Output units.** With ``every_row`` set (what :func:`prunescope.prune` does unless
``min_density=0.0``) no output unit is cut off: unstructured selection first keeps each row's
best live weight (row = dim 0: a Linear output feature, a Conv output channel; a 1-d tensor is
one row), then the rest of the count by score; block selection keeps each band of R rows' best
block; N:M keeps N of every M in every row anyway. :meth:`Pattern.floor` is the matching least
count of a tensor, which the allocation respects. Where no row would lose all its weights the
selection is exactly the plain top-k.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from prunescope.errors import ConfigError, PruningError

_NM = re.compile(r"^(\d+):(\d+)$")
_BLOCK = re.compile(r"^block:(\d+)x(\d+)$")


def topk_flat(flat: torch.Tensor, count: int) -> torch.Tensor:
    """Bool vector keeping exactly ``count`` highest entries of the 1-d ``flat``.

    Ties at the threshold go to the lower index, so the result equals a stable descending sort
    cut at ``count``; it is found in linear time (a k-th value, and a cumulative count of the
    ties only where some of them must go: a global ranking of ResNet-50's 25.5M weights spent
    0.34 s a call in that count, with one tie at the threshold).
    """
    size = flat.numel()
    if not 0 <= count <= size:
        raise PruningError(f"cannot keep {count} of {size} weights")
    if count == 0 or count == size:
        return torch.full((size,), count == size, dtype=torch.bool, device=flat.device)
    threshold = torch.kthvalue(flat.cpu(), size - count + 1).values.to(flat.device)
    above = flat > threshold
    at = flat == threshold
    room = count - int(above.count_nonzero())
    if int(at.count_nonzero()) == room:  # every tie is kept
        return above | at
    return above | (at & (torch.cumsum(at, 0) <= room))


def topk_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask keeping exactly ``count`` highest scores; ties go to the lower flat index."""
    return topk_flat(scores.detach().flatten(), count).view_as(scores)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as ``[rows, rest]``: dim 0 are the output units; a 1-d tensor is one row."""
    return tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.reshape(1, -1)


def row_best(scores: torch.Tensor) -> torch.Tensor:
    """Bool mask of each row's highest score (the lowest index among equal ones), in the rows
    that have a live (finite) score; rows are as in :func:`topk_rows`."""
    matrix = _rows(scores.detach())
    best = torch.zeros_like(matrix, dtype=torch.bool)
    live = torch.isfinite(matrix).any(dim=1)
    best[live.nonzero().squeeze(1), matrix[live].argmax(dim=1)] = True
    return best.view_as(scores)


def topk_rows(scores: torch.Tensor, count: int) -> torch.Tensor:
    """:func:`topk_mask` that first keeps every row's best live weight (dim 0 = output units).

    Equal to ``topk_mask(scores, count)`` whenever that already keeps a weight in every row with
    a live score; a ``count`` below the number of such rows falls back to it.
    """
    best = row_best(scores)
    if count < int(best.count_nonzero()):
        return topk_mask(scores, count)
    return topk_mask(torch.where(best, torch.inf, scores.detach()), count)


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern: ``kind`` is "unstructured", "nm" or "block"; ``every_row``: keep
    every output unit connected (see the module docstring)."""

    kind: str
    n: int = 0
    m: int = 0
    every_row: bool = False

    @property
    def fixed_density(self) -> float | None:
        """The density the pattern imposes on every tensor (N:M), or None."""
        return self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        return {"unstructured": "unstructured", "nm": f"{self.n}:{self.m}"}.get(
            self.kind, f"block:{self.n}x{self.m}"
        )

    def select(self, name: str, scores: torch.Tensor, count: int) -> torch.Tensor:
        """The keep-mask for one tensor; raises PruningError when the pattern does not fit it."""
        if self.kind == "unstructured":
            return topk_rows(scores, count) if self.every_row else topk_mask(scores, count)
        if self.kind == "nm":
            return _nm_mask(name, scores, self.n, self.m)
        return _block_mask(name, scores, count, self.n, self.m, self.every_row)

    def floor(self, scores: torch.Tensor, min_density: float | None) -> int:
        """The fewest weights a tensor with these scores (``-inf`` = already pruned) may keep.

        ``min_density=None`` (the default of :func:`prunescope.prune`): one weight per output
        unit; a float ``d`` in (0, 1): also at least ``ceil(d * numel)``; ``0.0``: no floor. A
        block pattern counts whole blocks (one R x C block per band of R rows); N:M fixes every
        row's density itself (0). Capped at the live weights: pruning never regrows.
        """
        if min_density == 0.0 or self.kind == "nm":
            return 0
        live = torch.isfinite(scores.detach())
        unit = self.n if self.kind == "block" else 1
        size = self.n * self.m if self.kind == "block" else 1
        rows = _rows(live).any(dim=1)
        units = int(rows[: rows.numel() - rows.numel() % unit].view(-1, unit).any(1).sum())
        count = max(math.ceil((min_density or 0.0) * scores.numel() - 1e-9), units * size)
        return min(math.ceil(count / size) * size, int(live.count_nonzero()))


def parse_pattern(text: str) -> Pattern:
    """Parse ``"unstructured"``, ``"N:M"`` or ``"block:RxC"``; anything else is a ConfigError."""
    text = str(text).strip()
    if text == "unstructured":
        return Pattern("unstructured")
    if match := _NM.match(text):
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise ConfigError(f"N:M pattern {text!r} needs 0 < N < M, e.g. 2:4")
        return Pattern("nm", n, m)
    if match := _BLOCK.match(text):
        rows, cols = int(match[1]), int(match[2])
        if rows < 1 or cols < 1 or rows * cols < 2:
            raise ConfigError(f"block pattern {text!r} needs a block of at least 2 weights")
        return Pattern("block", rows, cols)
    raise ConfigError(
        f"unknown pattern {text!r}; use 'unstructured', 'N:M' (e.g. 2:4) or 'block:RxC'"
    )


def _input_last(tensor: torch.Tensor) -> torch.Tensor:
    """Move dim 1 (the input dimension) last: [out, in, *k] -> [out, *k, in]."""
    return tensor.movedim(1, -1) if tensor.dim() > 1 else tensor.unsqueeze(0)


def _nm_mask(name: str, scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    moved = _input_last(scores.detach())
    if moved.shape[-1] % m:
        raise PruningError(
            f"{n}:{m} needs the input dimension of {name!r} ({moved.shape[-1]}) to be a multiple "
            f"of {m}; exclude that tensor or choose another M"
        )
    groups = moved.reshape(-1, m)
    order = torch.argsort(groups, dim=1, descending=True, stable=True)[:, :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
    keep = keep.view(moved.shape)
    return (keep.movedim(-1, 1) if scores.dim() > 1 else keep.squeeze(0)).contiguous()


def _block_mask(name: str, scores: torch.Tensor, count: int, rows: int, cols: int,
                every_row: bool = False) -> torch.Tensor:
    scores = scores.detach()
    matrix = scores.reshape(scores.shape[0], -1) if scores.dim() > 1 else scores.view(1, -1)
    height, width = matrix.shape
    if height % rows or width % cols:
        raise PruningError(
            f"block {rows}x{cols} does not tile {name!r} viewed as {height}x{width}; "
            "choose a block that divides both dimensions or exclude the tensor"
        )
    blocks = matrix.reshape(height // rows, rows, width // cols, cols).transpose(1, 2)
    block_scores = blocks.double().mean(dim=(2, 3))
    kept_blocks = min(math.floor(count / (rows * cols) + 0.5), block_scores.numel())
    keep_blocks = (topk_rows if every_row else topk_mask)(block_scores, kept_blocks)
    keep = keep_blocks[:, :, None, None].expand(-1, -1, rows, cols).transpose(1, 2)
    return keep.reshape(scores.shape).contiguous()
