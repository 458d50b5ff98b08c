"""The compressed weight format of the sparse layers: CSR over output rows plus its transpose.

A Linear weight ``[out, in]`` or a Conv2d weight ``[out, in / groups, kh, kw]`` with a bool mask
is stored as its kept values in row-major order (so ``values == weight[mask]``), grouped by output
row (``ptr``: row ``k`` owns ``values[ptr[k]:ptr[k + 1]]``), each with its column ``idx`` in the
row's flattened ``[in / groups, kh, kw]``. The backward pass also walks the weights by input
feature/channel: ``cptr`` groups them by global input channel, ``cperm`` gives each one's position
in ``values`` and ``crow`` its output row. Indices are int32, pointers int64.
"""

from __future__ import annotations

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
    columns = keep.shape[1]
    kept = keep.nonzero()
    row, column = kept[:, 0], kept[:, 1]
    ptr = _pointers(row, rows)
    taps_per_channel = columns // (weight.shape[1] if weight.dim() == 4 else columns)
    # global input channel (Conv2d) or feature (Linear) of each kept weight
    channels_per_group = weight.shape[1] if weight.dim() == 4 else columns
    group = row // (rows // groups)
    channel = group * channels_per_group + column // taps_per_channel
    in_total = channels_per_group * groups
    order = torch.argsort(channel, stable=True)
    return Compressed(
        values=weight.detach().reshape(rows, -1)[keep].contiguous(),
        ptr=ptr, idx=column.to(torch.int32).contiguous(),
        cptr=_pointers(channel[order], in_total),
        cperm=order.to(torch.int32).contiguous(),
        crow=row[order].to(torch.int32).contiguous(),
    )


def _pointers(sorted_rows: torch.Tensor, rows: int) -> torch.Tensor:
    ptr = torch.zeros(rows + 1, dtype=torch.int64)
    ptr[1:] = torch.bincount(sorted_rows, minlength=rows).cumsum(0)
    return ptr


def densify(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The dense weight: ``values`` at the True entries of ``mask`` (row-major), zeros elsewhere.

    Differentiable in ``values``: the gradient of a kept weight is the dense gradient at its place.
    """
    return values.new_zeros(mask.shape).masked_scatter(mask.to(values.device), values)
