"""Exact OBC: layer-wise pruning by greedy Optimal Brain Surgeon, one weight at a time.

Frantar & Alistarh (NeurIPS 2022), "Optimal Brain Compression: A Framework for Accurate
Post-Training Quantization and Pruning", the ExactOBS algorithm. A layer is pruned to reproduce
its outputs on calibration inputs, ``min ||W X - W' X||^2`` with ``H = X X^T`` per example (the
set-up, Hessians and layer order of :mod:`prunescope.second_order.obc`). The loss is a sum over
the rows of ``W``, all with the same ``H``, so every row is pruned on its own: repeatedly remove
the remaining weight ``p`` with the smallest OBS saliency ``w_p^2 / [H^-1]_pp`` (the rise of the
loss when it is removed and the rest of the row corrected), correct the row
``w <- w - (w_p / [H^-1]_pp) H^-1[:, p]`` and drop row and column ``p`` from ``H^-1`` by one step
of Gaussian elimination, ``H^-1 <- H^-1 - H^-1[:, p] H^-1[p, :] / [H^-1]_pp``.

How a layer's count is spread over its rows (the paper's global mask per layer): a layer-level
greedy that at each step removes the smallest saliency over all rows. A row's sequence of
removals does not depend on the other rows, so each row is run to its end first, recording the
saliency of every step; merging the rows' sequences by always taking the smallest next saliency
removes exactly the steps with the layer's smallest running maxima ``max_{s <= t} saliency_s``
(a step waits behind its row's earlier, larger ones; ties: lower row, then earlier step), which
is how it is computed. Under N:M each row's greedy is restricted to the groups of M inputs that
still have fewer than M - N weights removed, and stops when none has. With ``every_row``
(``prunescope.prune``'s default) and a count of at least one weight per row, a row's last weight
is never removed, so no output unit is cut off.

The kept weights are finally set to the least-squares optimum on the chosen support, solved
directly once the counts are known: that is exactly what the sequence of OBS updates computes
(exact inverse updates make the result independent of the order), without keeping every row's
weights at every step. Weights already pruned are removed first (they are zero, so only ``H^-1``
changes); weights on inputs that are zero over the calibration data score 0; with ``bias`` the
bias is a never-pruned constant column, corrected with the rest (as for ``sparsegpt``).
``sequential`` feeds each layer the already pruned network after the same least-squares refit
to the original outputs as ``sparsegpt``. Block patterns are refused (use ``sparsegpt``).

Cost: every row runs all its ``cols`` steps (``cols`` counts the bias column), whatever the
sparsity, on a ``cols x cols`` inverse compacted each time a quarter of it is removed: about
``rows * cols^3 / 2`` float64 multiply-adds per layer, memory-bound. Measured on one core of a
shared 2-core machine (load ~6): 0.5-1.1 ns per unit of ``rows * cols^3`` (100 x 785: 22 s;
300 x 301: 4.7 s; 1000 x 101: 1.1 s). Layers whose ``rows * cols^3`` exceeds ``max_work``
(default 5e10, about 25 s there) are refused before anything is pruned, naming ``sparsegpt``
(LeNet-300-100's first layer on MNIST, 300 x 785, is 1.5e11). Rows are processed in chunks
whose inverses take at most ``CHUNK_BYTES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from prunescope.criteria import Context, Criterion, Scores
from prunescope.errors import PruningError
from prunescope.mask import Mask
from prunescope.patterns import Pattern
from prunescope.second_order.fisher import inverse_from_factor
from prunescope.second_order.obc import (
    CACHE_KEY,
    _damped,
    _refit_rows,
    calibration_inputs,
    layer_of,
    layerwise_scores,
    prune_layers,
)

CHUNK_BYTES = 1 << 27  # 128 MiB of per-row inverses at a time
MAX_WORK = 5e10


# -- one row's greedy, for a chunk of rows at once -------------------------------------------
@dataclass
class _Rows:
    """A chunk of rows in compacted coordinates: ``index[b, j]`` is the original column of
    position ``j`` of row ``b``; the other ``[b, j]`` tensors follow it."""

    index: torch.Tensor
    w: torch.Tensor
    inverse: torch.Tensor
    alive: torch.Tensor
    forced: torch.Tensor
    removable: torch.Tensor
    silent: torch.Tensor  # inputs that are always zero: their removal scores 0
    group: torch.Tensor | None = None  # N:M group of each column, -1 for the bias

    def compact(self) -> None:
        """Drop the removed positions (every row has removed the same number)."""
        batch = torch.arange(self.alive.shape[0])
        keep = self.alive.nonzero()[:, 1].view(len(batch), int(self.alive[0].sum()))
        self.inverse = self.inverse[batch[:, None, None], keep[:, :, None], keep[:, None, :]]
        for field in ("index", "w", "alive", "forced", "removable", "silent", "group"):
            if getattr(self, field) is not None:
                setattr(self, field, getattr(self, field).gather(1, keep))


def _candidates(rows: _Rows, left: torch.Tensor | None) -> torch.Tensor:
    """Positions each row may remove now: its forced ones first, else removable ones (under N:M
    only in groups with removals ``left``), else any removable one (padding past the end)."""
    forced = rows.alive & rows.forced
    free = rows.alive & rows.removable
    if left is not None:
        free = free & (left.gather(1, rows.group.clamp(min=0)) > 0) & (rows.group >= 0)
    free = torch.where(free.any(1, keepdim=True), free, rows.alive & rows.removable)
    return torch.where(forced.any(1, keepdim=True), forced, free)


def _step(rows: _Rows, left: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove one weight per row, the candidate of least saliency; returns its original column
    and saliency (``-inf`` for a forced one, ``+inf`` for padding)."""
    candidates = _candidates(rows, left)
    diagonal = rows.inverse.diagonal(dim1=1, dim2=2)
    saliency = torch.where(rows.silent, 0.0, rows.w.square() / diagonal)
    p = torch.where(candidates, saliency, torch.inf).argmin(1, keepdim=True)
    value = saliency.gather(1, p).squeeze(1)
    value[rows.forced.gather(1, p).squeeze(1)] = -torch.inf
    if left is not None:
        group = rows.group.gather(1, p)
        padding = (left.gather(1, group.clamp(min=0)) <= 0).squeeze(1) & ~value.isneginf()
        value[padding] = torch.inf
        left.scatter_add_(1, group, -(~rows.forced.gather(1, p)).long())
    column = rows.inverse.gather(2, p[:, None, :].expand(-1, rows.inverse.shape[1], 1))[..., 0]
    pivot = column.gather(1, p)
    rows.w -= rows.w.gather(1, p) / pivot * column
    rows.inverse.baddbmm_(column[:, :, None], (column / pivot)[:, None, :], alpha=-1.0)
    rows.w.scatter_(1, p, 0.0)
    rows.alive.scatter_(1, p, False)
    return rows.index.gather(1, p).squeeze(1), value


def _trajectories(rows: _Rows, steps: int, left: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``steps`` removals on every row of the chunk: ``(columns, saliencies)``, each
    ``[rows, steps]`` in the order removed; the inverses are compacted each time a quarter of
    their positions is removed (an indexed copy costs far more per entry than an update)."""
    order, saliency = [], []
    removed = 0
    for _ in range(steps):
        column, value = _step(rows, left)
        order.append(column)
        saliency.append(value)
        removed += 1
        if removed * 4 >= rows.index.shape[1]:
            rows.compact()
            removed = 0
    empty = torch.zeros(rows.index.shape[0], 0)
    return (torch.stack(order, 1) if order else empty.long(),
            torch.stack(saliency, 1) if saliency else empty.double())


def greedy_rows(w: torch.Tensor, inverse: torch.Tensor, *, forced: torch.Tensor,
                removable: torch.Tensor, silent: torch.Tensor, steps: int,
                nm: tuple[int, int] | None = None, chunk_bytes: int = CHUNK_BYTES
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's greedy OBS removals: ``steps`` per row, chunk by chunk of rows.

    ``w`` ``[rows, total]`` and ``inverse`` ``[total, total]`` (``H^-1``, float64) include any
    bias column; ``forced`` (removed first), ``removable`` (may be removed; False for the bias)
    are ``[rows, total]``, ``silent`` ``[total]`` marks inputs that are always zero. Under
    ``nm`` each group of M removable columns loses M - N weights (forced ones count), then the
    row pads with saliency ``+inf``. Returns ``(columns, saliencies)`` ``[rows, steps]``.
    """
    total = w.shape[1]
    chunk = max(1, chunk_bytes // (8 * total * total))
    group = None
    if nm is not None:
        group = torch.where(removable[0], torch.arange(total) // nm[1], -1)
    results = []
    for start in range(0, w.shape[0], chunk):
        part = slice(start, start + chunk)
        size = w[part].shape[0]
        rows = _Rows(torch.arange(total).expand(size, -1), w[part].clone(),
                     inverse.expand(size, -1, -1).clone(), torch.ones(size, total, dtype=bool),
                     forced[part], removable[part], silent.expand(size, -1),
                     None if group is None else group.expand(size, -1))
        left = None
        if nm is not None:
            dead = forced[part, :int(removable[0].sum())].view(size, -1, nm[1]).sum(2)
            left = (nm[1] - nm[0] - dead).clamp(min=0)
        results.append(_trajectories(rows, steps, left))
    return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])


# -- a layer ---------------------------------------------------------------------------------
def _layer_removals(saliency: torch.Tensor, removed: int, last_protected: torch.Tensor
                    ) -> torch.Tensor:
    """How many of each row's steps the layer-level greedy takes to remove ``removed`` weights:
    the ``removed`` smallest running maxima of the rows' saliencies; a row's last step is never
    taken where ``last_protected``."""
    keys = saliency.cummax(1).values
    keys[last_protected, -1] = torch.inf
    if removed > int(torch.isfinite(keys).sum() + keys.isneginf().sum()):
        raise PruningError(f"cannot remove {removed} weights of a layer with {keys.numel()}")
    chosen = keys.flatten().argsort(stable=True)[:removed]
    return torch.bincount(chosen // keys.shape[1], minlength=keys.shape[0])


def exact_obc(weight: torch.Tensor, hessian: torch.Tensor, *, live: torch.Tensor,
              keep: int | None = None, nm: tuple[int, int] | None = None,
              fixed: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              every_row: bool = False, dampening: float = 0.01, chunk_bytes: int = CHUNK_BYTES
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Prune the matrix ``weight`` ``[rows, cols]`` by exact greedy OBS, correcting the rest.

    The contract of :func:`prunescope.second_order.obc.reconstruct` (``keep``: weights kept in
    the layer, or ``nm``; weights where ``live`` is False are pruned; a ``bias`` adds a trailing
    Hessian column), except that a ``fixed`` mask is refused. With ``every_row`` and ``keep`` at
    least the rows with a live weight, every such row keeps one. Returns
    ``(weight, keep-mask, bias)``.
    """
    if fixed is not None or (keep is None) == (nm is None):
        raise PruningError("exact OBC prunes to a count or N:M, not to a fixed mask; use sparsegpt")
    rows, cols = weight.shape
    w = weight.detach().double()
    if bias is not None:
        w = torch.cat([w, bias.detach().double().reshape(-1, 1)], dim=1)
    damped = _damped(hessian, dampening)
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info):
        raise PruningError(f"the layer Hessian is singular with dampening {dampening}; raise it")
    extra = torch.zeros(rows, w.shape[1] - cols, dtype=torch.bool)
    forced = torch.cat([~live, extra], dim=1)
    removable = torch.cat([torch.ones_like(live), extra], dim=1)
    silent = hessian.diagonal() == 0
    if nm is not None:
        steps = int((~live).view(rows, -1, nm[1]).sum(2).clamp(min=nm[1] - nm[0]).sum(1).max())
    else:
        steps = cols
    order, saliency = greedy_rows(w, inverse_from_factor(factor), forced=forced,
                                  removable=removable, silent=silent, steps=steps, nm=nm,
                                  chunk_bytes=chunk_bytes)
    if nm is not None:
        counts = saliency.isfinite().sum(1) + saliency.isneginf().sum(1)
    else:
        counts = _counts(saliency, live, keep, every_row)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    taken = torch.arange(order.shape[1]) < counts[:, None]
    pruned[torch.arange(rows)[:, None].expand_as(order)[taken], order[taken]] = True
    w = _refit_rows(w, damped, ~pruned)
    new_bias = w[:, cols].to(bias.dtype) if bias is not None else None
    return w[:, :cols].to(weight.dtype), ~pruned[:, :cols], new_bias


def _counts(saliency: torch.Tensor, live: torch.Tensor, keep: int, every_row: bool
            ) -> torch.Tensor:
    """Steps of each row taken so that the layer keeps ``keep`` of its live weights."""
    alive = int(live.sum())
    if not 0 <= keep <= alive:
        raise PruningError(f"cannot keep {keep} weights of a layer with {alive} live ones")
    has_live = live.any(1)
    if not (every_row and keep >= int(has_live.sum())):
        has_live = torch.zeros_like(has_live)
    return _layer_removals(saliency, saliency.numel() - keep, has_live)


# -- the criterion ---------------------------------------------------------------------------
def check_size(model: nn.Module, names: Sequence[str], max_work: float, bias: bool) -> None:
    """PruningError naming the first layer whose ``rows * cols^3`` exceeds ``max_work``."""
    for name in names:
        layer = layer_of(model, name)
        rows = layer.weight.shape[0]
        cols = layer.weight[0].numel() + int(bias and layer.bias is not None)
        work = rows * cols**3
        if work > max_work:
            raise PruningError(
                f"layer {name!r} ({rows} x {cols} with its bias) is too large for exact OBC "
                f"(rows * cols^3 = {work:.2g} > max_work {max_work:.2g}): use criterion "
                "'sparsegpt', exclude the layer or raise OBC(max_work=...)")


@dataclass(frozen=True)
class OBC:
    """Exact OBC (Frantar & Alistarh, NeurIPS 2022) as a criterion, with settings.

    ``dampening``: ``lambda`` relative to the mean Hessian diagonal. ``sequential`` and ``bias``:
    as for :class:`prunescope.second_order.obc.SparseGPT`. ``max_work``: the largest
    ``rows * cols^3`` of a layer (cost, see the module docstring). The allocation ranks the OBS
    saliencies ``w^2 / [H^-1]_qq`` of the unpruned model; the greedy then fills each layer's
    count.
    """

    dampening: float = 0.01
    sequential: bool = True
    bias: bool = True
    max_work: float = MAX_WORK

    def score(self, model: nn.Module, names: Sequence[str], context: Context) -> Scores:
        """OBS saliencies per layer; the Hessians are kept for :meth:`solve`."""
        check_size(model, names, self.max_work, self.bias)
        return layerwise_scores(model, names, context, criterion="obc",
                                dampening=self.dampening, bias=self.bias)

    def solve(self, model: nn.Module, current: Mask, counts: dict[str, int], pattern: Pattern,
              context: Context) -> Mask:
        """Prune every layer to its count (or N:M) by exact greedy OBS."""
        if pattern.kind == "block":
            raise PruningError(f"criterion 'obc' prunes unstructured or N:M, not {pattern}; "
                               "use criterion 'sparsegpt'")
        check_size(model, list(current), self.max_work, self.bias)
        return prune_layers(model, current, pattern, calibration_inputs(context, "obc"),
                            counts=counts, sequential=self.sequential, dampening=self.dampening,
                            bias=self.bias, known=context.cache.pop(CACHE_KEY, None),
                            solver=partial(exact_obc, dampening=self.dampening))

    def criterion(self, name: str = "obc") -> Criterion:
        """This configuration as a :class:`Criterion` for :func:`prunescope.prune`."""
        return Criterion(name, self.score, needs_data=True, solve=self.solve)


CRITERION = OBC().criterion()
"""The registered ``obc`` criterion, with the default settings."""
