"""The compressed weight format of the sparse layers: CSR over output rows plus its transpose.

A Linear weight ``[out, in]`` or a Conv2d weight ``[out, in / groups, kh, kw]`` with a bool mask
is stored as its kept values in row-major order (so ``values == weight[mask]``), grouped by output
row (``ptr``: row ``k`` owns ``values[ptr[k]:ptr[k + 1]]``), each with its column ``idx`` in the
row's flattened ``[in / groups, kh, kw]``. The backward pass also walks the weights by input
feature/channel: ``cptr`` groups them by global input channel, ``cperm`` gives each one's position
in ``values`` and ``crow`` its output row. Indices are int32, pointers int64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Compressed:
    """Kept weights (CSR order) and the index structure the kernels walk."""

    values: torch.Tensor
    ptr: torch.Tensor
    idx: torch.Tensor
    cptr: torch.Tensor
    cperm: torch.Tensor
    crow: torch.Tensor

    def structure(self) -> dict[str, torch.Tensor]:
        """The index tensors by name (the layers keep them as buffers)."""
        return {"ptr": self.ptr, "idx": self.idx, "cptr": self.cptr, "cperm": self.cperm,
                "crow": self.crow}


def compress(weight: torch.Tensor, mask: torch.Tensor, groups: int = 1) -> Compressed:
    """Compress ``weight`` (2-d Linear or 4-d Conv2d) keeping the entries where ``mask`` is True.

    Entries of ``weight`` outside the mask are ignored (not required to be zero).
    """
    rows = weight.shape[0]
    keep = mask.reshape(rows, -1)
    kept = keep.nonzero()
    return Compressed(values=weight.detach().reshape(rows, -1)[keep].contiguous(),
                      **index_structure(kept[:, 0], kept[:, 1], tuple(weight.shape), groups))


def index_structure(row: torch.Tensor, column: torch.Tensor, shape: tuple[int, ...],
                    groups: int = 1) -> dict[str, torch.Tensor]:
    """The index tensors (``ptr``, ``idx``, ``cptr``, ``cperm``, ``crow``) of the kept weights at
    ``row``, ``column`` (row-major order; ``column`` indexes a row's flattened
    ``[in / groups, kh, kw]``) of a weight of ``shape`` (2-d Linear or 4-d Conv2d)."""
    rows = shape[0]
    columns = math.prod(shape[1:])
    # global input channel (Conv2d) or feature (Linear) of each kept weight
    channels_per_group = shape[1] if len(shape) == 4 else columns
    channel = (row // (rows // groups)) * channels_per_group + column // (columns //
                                                                        channels_per_group)
    order = torch.argsort(channel.to(torch.int32), stable=True)  # int32 keys sort faster
    return {"ptr": _pointers(row, rows), "idx": column.to(torch.int32).contiguous(),
            "cptr": _pointers(channel[order], channels_per_group * groups),
            "cperm": order.to(torch.int32).contiguous(),
            "crow": row[order].to(torch.int32).contiguous()}


def _pointers(sorted_rows: torch.Tensor, rows: int) -> torch.Tensor:
    ptr = torch.zeros(rows + 1, dtype=torch.int64)
    ptr[1:] = torch.bincount(sorted_rows, minlength=rows).cumsum(0)
    return ptr


def densify(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The dense weight: ``values`` at the True entries of ``mask`` (row-major), zeros elsewhere.

    Differentiable in ``values``: the gradient of a kept weight is the dense gradient at its place.
    """
    return values.new_zeros(mask.shape).masked_scatter(mask.to(values.device), values)
