"""Layer-wise reconstruction pruning, and SparseGPT's column pass (the ``sparsegpt`` criterion).

Each layer is pruned to reproduce its own outputs on calibration inputs ``X``, i.e. to minimise
``||W X - W' X||^2`` over sparse ``W'``, whose Hessian is ``H = X X^T`` (here averaged per
calibration example). This module holds what every such method shares (the calibration inputs
and Hessians, :func:`prune_layers` running a per-layer solver over a model in order) and
SparseGPT's solver, :func:`reconstruct` (Frantar & Alistarh, ICML 2023, "SparseGPT"; exact
greedy OBC, Frantar & Alistarh, NeurIPS 2022, is :mod:`prunescope.second_order.exact_obc`).

With the upper Cholesky factor ``U`` of ``H^-1`` the columns are processed left to right: a
column's pruned entries are zeroed and their error ``(w - q) / U_ii`` is spread over the columns
not yet processed (SparseGPT's sequential OBS update, applied lazily in blocks of 128 columns).
Which weights a block prunes is chosen adaptively when the block starts, by ``w^2 / U_ii^2`` on
the weights as already corrected:

- unstructured, with an exact count per layer: the count is split over the column blocks by the
  initial scores, then each block keeps its quota of highest current scores; under a pattern
  with ``every_row`` (``prunescope.prune``'s default ``min_density``) each row's best initial
  weight is always kept, so no output unit is cut off;
- N:M: in every group of M consecutive inputs, the M - N lowest current scores;
- any other pattern (block): the mask is fixed beforehand and only the weights are corrected.

prunescope's additions to SparseGPT: with ``bias=True`` a layer's bias is an extra, never-pruned
last column fed by a constant input of 1, so the error of removing inputs that are constant over
the calibration data (the background of normalised images) is absorbed by the bias instead of
being piled onto another weight. Weights on inputs that are zero over the whole calibration data
(dead ReLUs) score 0. After the column pass, each row's kept weights are refit exactly (least
squares on the row's support, ``refit=True``). Layers are processed in model order; with
``sequential=True`` each layer's calibration inputs come from the network whose earlier layers
are already pruned (as in SparseGPT), and the layer is first refit by least squares to reproduce
the *original* network's outputs from them (``W <- W X0 X^T (X X^T)^-1``, so that it also undoes
the error of the layers before it, rather than only reproducing its own dense output on the
changed inputs as SparseGPT does); otherwise every layer sees the original network's inputs (as
in SPADE).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from prunescope.criteria import Context, Criterion, Scores
from prunescope.errors import PruningError
from prunescope.mask import Mask
from prunescope.patterns import Pattern, row_best, topk_mask, topk_rows
from prunescope.second_order.fisher import inverse_from_factor

CACHE_KEY = "layerwise-hessians"
LAYERS = (nn.Linear, nn.Conv2d)


# -- calibration inputs ----------------------------------------------------------------------
def layer_of(model: nn.Module, name: str) -> nn.Linear | nn.Conv2d:
    """The Linear or Conv2d layer whose ``weight`` is ``name``; PruningError for anything else."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr != "weight" or not isinstance(module, LAYERS) or getattr(module, "groups", 1) != 1:
        raise PruningError(
            f"layer-wise reconstruction prunes weights of Linear and ungrouped Conv2d layers, "
            f"not {name!r}; exclude it"
        )
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        raise PruningError(f"layer-wise reconstruction needs zero padding in {name!r}; exclude it")
    return module


def input_rows(layer: nn.Module, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """The layer's input as rows ``[positions, columns]`` matching ``weight.flatten(1)``, with a
    trailing column of ones when the layer has a bias and ``bias`` is set."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, layer.in_features)
    rows = rows.double()
    if bias and layer.bias is not None:
        rows = torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1)
    return rows


@torch.no_grad()
def hessians(model: nn.Module, layers: Mapping[str, nn.Module], inputs: Sequence[torch.Tensor],
             *, bias: bool = True) -> dict[str, torch.Tensor]:
    """``H = 1/N sum X X^T`` (float64) of each layer's input over the ``inputs`` batches, from
    one forward pass per batch in eval mode, captured with forward hooks; with ``bias``, layers
    that have one get the constant input as a last column."""
    totals: dict[str, torch.Tensor] = {}
    count = sum(len(x) for x in inputs)
    if count == 0:
        raise PruningError("layer-wise reconstruction needs calibration inputs: pass data=")

    def capture(name: str):
        def hook(module, args, output):
            rows = input_rows(module, args[0].detach(), bias)
            total = rows.T @ rows / count
            totals[name] = totals[name] + total if name in totals else total
        return hook

    handles = [layer.register_forward_hook(capture(n)) for n, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for x in inputs:
            model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    missing = [n for n in layers if n not in totals]
    if missing:
        raise PruningError(f"layer {missing[0]!r} was not called in the forward pass; exclude it")
    return totals


# -- the column-by-column solver -------------------------------------------------------------
def _damped(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """``H + lambda I`` in float64, ``lambda = dampening * mean(diag H)``; a zero diagonal entry
    (an input that is always zero, whose weights are free to remove) becomes 1 first."""
    h = hessian.double().clone()
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1.0
    diagonal.add_(dampening * float(diagonal.mean()))
    return h


def _inverse_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + lambda I)^-1``."""
    factor, info = torch.linalg.cholesky_ex(_damped(hessian, dampening))
    if int(info):
        raise PruningError(f"the layer Hessian is singular with dampening {dampening}; raise it")
    return torch.linalg.cholesky(inverse_from_factor(factor), upper=True)


def _refit_rows(w: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per row, ``argmin (v - w)^T H (v - w)`` over ``v`` supported on ``keep``: ``v_K =
    H_KK^-1 H_K: w`` (the joint OBS update of removing everything else)."""
    out = torch.zeros_like(w)
    for row in range(w.shape[0]):
        support = keep[row].nonzero().squeeze(1)
        if support.numel():
            system = hessian[support][:, support]
            out[row, support] = torch.linalg.solve(system, hessian[support] @ w[row])
    return out


def reconstruct(weight: torch.Tensor, hessian: torch.Tensor, *, live: torch.Tensor,
                keep: int | None = None, nm: tuple[int, int] | None = None,
                fixed: torch.Tensor | None = None, dampening: float = 0.01, block: int = 128,
                bias: torch.Tensor | None = None, refit: bool = True, every_row: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Prune the matrix ``weight`` ``[rows, cols]`` given its input Hessian, correcting the rest.

    Exactly one of ``keep`` (count of weights kept), ``nm`` ((N, M): keep N of every M inputs)
    or ``fixed`` (the keep-mask) says what to prune; weights where ``live`` is False are always
    pruned. With a ``bias``, ``hessian`` has one more trailing column (the constant input) and
    the bias is corrected too. With ``refit`` the kept weights of each row are finally set to
    the exact OBS solution for the chosen mask (least squares on the row's support, the optimum
    the column pass approximates). With ``every_row`` and ``keep``, each row's best initial
    weight is kept (when ``keep`` covers the rows). Returns ``(weight, keep-mask, bias)``;
    pruned weights are 0.
    """
    if sum(x is not None for x in (keep, nm, fixed)) != 1:
        raise PruningError("layer-wise reconstruction needs exactly one of keep, nm or fixed")
    rows, cols = weight.shape
    w = weight.detach().double().clone()
    if bias is not None:
        w = torch.cat([w, bias.detach().double().reshape(-1, 1)], dim=1)
    total, original = w.shape[1], w.clone()
    factor = _inverse_factor(hessian, dampening)
    always = torch.ones(rows, total - cols, dtype=torch.bool)  # the bias column is never pruned
    live = torch.cat([live, always], dim=1)
    fixed = None if fixed is None else torch.cat([fixed, always], dim=1)
    if nm is not None:
        block = max(nm[1], block - block % nm[1])
    scale = factor.diagonal().square()
    scale[hessian.diagonal() == 0] = torch.inf  # weights on inputs that are always 0 score 0
    pruned = torch.zeros(rows, total, dtype=torch.bool)
    protect = torch.zeros(rows, total, dtype=torch.bool)
    quotas = None
    if keep is not None:
        quotas, protect = _quotas(w, scale, live, keep, block, cols, every_row)
    for start in range(0, total, block):
        end = min(start + block, total)
        sub, err = w[:, start:end], torch.zeros(rows, end - start, dtype=torch.float64)
        local = factor[start:end, start:end]
        prune = _block_mask(sub, scale[start:end], live[:, start:end],
                            None if fixed is None else fixed[:, start:end],
                            None if quotas is None else quotas[start // block],
                            max(0, end - max(start, cols)), protect[:, start:end])
        for i in range(end - start):
            if nm is not None and (start + i) % nm[1] == 0 and start + i < cols:
                group = slice(i, i + nm[1])
                prune[:, group] |= _nm_prune(sub[:, group], scale[start:end][group],
                                             live[:, start:end][:, group], nm[0])
            column = sub[:, i]
            target = torch.where(prune[:, i], 0.0, column)
            err[:, i] = (column - target) / local[i, i]
            sub[:, i:] -= err[:, i:i + 1] * local[i:i + 1, i:]
            sub[:, i] = target
        w[:, end:] -= err @ factor[start:end, end:]
        pruned[:, start:end] = prune
    w[pruned] = 0.0
    if refit:
        w = _refit_rows(original, _damped(hessian, dampening), ~pruned)
    new_bias = w[:, cols].to(bias.dtype) if bias is not None else None
    return w[:, :cols].to(weight.dtype), ~pruned[:, :cols], new_bias


def _quotas(w, scale, live, keep, block, cols, every_row
            ) -> tuple[list[int], torch.Tensor]:
    """Kept weights per column block: where the ``keep`` best initial scores lie (each row's
    best first, with ``every_row``); and the weights that must stay (those row bests)."""
    scores = torch.where(live, w.square() / scale, -torch.inf)[:, :cols]
    if keep > int(live[:, :cols].sum()):
        raise PruningError(f"cannot keep {keep} weights of a layer with "
                           f"{int(live[:, :cols].sum())} live ones")
    protect = torch.zeros_like(live)
    if every_row and keep >= int(row_best(scores).sum()):
        protect[:, :cols] = row_best(scores)
    best = (topk_rows if every_row else topk_mask)(scores, keep)
    return [int(best[:, s:s + block].sum()) for s in range(0, w.shape[1], block)], protect


def _block_mask(sub, scale, live, fixed, quota, extra, protect) -> torch.Tensor:
    """Pruned-mask of one column block, chosen on the weights as corrected so far; the last
    ``extra`` columns (the bias) and the ``protect`` weights are always kept."""
    if fixed is not None:
        return ~fixed | ~live
    if quota is None:  # N:M: the groups are chosen column by column
        return ~live
    scores = torch.where(live, sub.square() / scale, -torch.inf)
    scores[protect] = torch.inf
    scores[:, scores.shape[1] - extra:] = torch.inf
    return ~topk_mask(scores, quota + extra * sub.shape[0]) | ~live


def _nm_prune(group: torch.Tensor, scale: torch.Tensor, live: torch.Tensor, n: int
              ) -> torch.Tensor:
    """Prune-mask of the M - N lowest ``w^2 / U_ii^2`` in each row of an ``[rows, M]`` group."""
    scores = torch.where(live, group.square() / scale, -torch.inf)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    return torch.ones_like(group, dtype=torch.bool).scatter_(1, order[:, :n], False) | ~live


# -- layer by layer --------------------------------------------------------------------------
def layer_scores(weight: torch.Tensor, hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """OBS saliency ``w_q^2 / [H^-1]_qq`` of every weight of a layer: the rise of the layer's
    per-example squared output error when ``w_q`` alone is removed and the rest corrected."""
    inverse = inverse_from_factor(torch.linalg.cholesky(_damped(hessian, dampening))).diagonal()
    inverse[hessian.diagonal() == 0] = torch.inf  # weights on inputs that are always 0 score 0
    columns = weight[0].numel()
    return (weight.detach().double().reshape(weight.shape[0], -1).square()
            / inverse[:columns]).reshape(weight.shape)


@torch.no_grad()
def paired_hessians(model: nn.Module, reference: nn.Module, name: str,
                    inputs: Sequence[torch.Tensor], *, bias: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X X^T, X0 X^T) / N`` for the layer ``name``: ``X`` its inputs in ``model``, ``X0`` in
    ``reference`` (the network before pruning), on the same examples."""
    rows: dict[int, torch.Tensor] = {}
    def capture(key: int):
        def hook(module, args, output):
            rows[key] = input_rows(module, args[0], bias)
        return hook

    module_name = name.rpartition(".")[0]
    handles = [net.get_submodule(module_name).register_forward_hook(capture(key))
               for key, net in enumerate((model, reference))]
    count = sum(len(x) for x in inputs)
    hessian = cross = torch.zeros(())
    modes = model.training, reference.training
    model.eval(), reference.eval()
    try:
        for x in inputs:
            model(x), reference(x)
            hessian = hessian + rows[0].T @ rows[0] / count
            cross = cross + rows[1].T @ rows[0] / count
    finally:
        model.train(modes[0]), reference.train(modes[1])
        for handle in handles:
            handle.remove()
    return hessian, cross


def _refit_(layer: nn.Module, hessian: torch.Tensor, cross: torch.Tensor, dampening: float
            ) -> None:
    """Least-squares refit ``W <- W C (H + lambda I)^-1`` of a layer whose inputs changed: the
    weights that best reproduce the original outputs ``W X0`` from the current inputs ``X``."""
    weight = layer.weight
    w = weight.detach().double().reshape(weight.shape[0], -1)
    with_bias = hessian.shape[0] > w.shape[1]
    if with_bias:
        w = torch.cat([w, layer.bias.detach().double().reshape(-1, 1)], dim=1)
    refit = torch.linalg.solve(_damped(hessian, dampening), (w @ cross).T).T
    weight.copy_(refit[:, :weight[0].numel()].reshape(weight.shape))
    if with_bias:
        layer.bias.copy_(refit[:, -1])


Solver = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
"""A per-matrix solver with :func:`reconstruct`'s contract: ``(weight, hessian, *, live, bias,
keep= | nm= | fixed=, every_row=) -> (weight, keep-mask, bias)``."""


@torch.no_grad()
def prune_layers(model: nn.Module, current: Mask, pattern: Pattern, inputs: Sequence[torch.Tensor],
                 *, counts: Mapping[str, int] | None = None, sequential: bool = True,
                 dampening: float = 0.01, block: int = 128, bias: bool = True,
                 known: Mapping[str, torch.Tensor] | None = None,
                 solver: Solver | None = None) -> Mask:
    """Prune every tensor of ``current`` by layer-wise reconstruction, in model order, in place.

    ``counts`` (kept weights per tensor) is needed unless the pattern is N:M. ``known`` holds
    input Hessians already computed on the model as it is now (reused where still valid). With
    ``sequential``, a layer after the first sees the inputs of the network pruned so far and
    is first refit by least squares to the original network's outputs, then pruned. With
    ``bias`` the layers' biases take part in the reconstruction (and are corrected). ``solver``
    prunes one layer's matrix (default: SparseGPT's :func:`reconstruct` with ``dampening`` and
    ``block``). Returns the new mask, a subset of ``current``.
    """
    if counts is None and pattern.kind != "nm":
        raise PruningError(f"layer-wise reconstruction under the {pattern} pattern needs the "
                           "kept count of every tensor (counts=)")
    solver = solver or partial(reconstruct, dampening=dampening, block=block)
    layers = {n: layer_of(model, n) for n in current}
    known = dict(known or {})
    if not sequential and any(n not in known for n in layers):
        known = hessians(model, layers, inputs, bias=bias)
    reference = copy.deepcopy(model) if sequential and len(layers) > 1 else None
    kept = {}
    for number, (name, layer) in enumerate(layers.items()):
        if reference is not None and number > 0:
            hessian, cross = paired_hessians(model, reference, name, inputs, bias=bias)
            _refit_(layer, hessian, cross, dampening)
        elif name in known:
            hessian = known[name]
        else:
            hessian = hessians(model, {name: layer}, inputs, bias=bias)[name]
        kept[name] = _prune_layer(name, layer, hessian, current[name], pattern,
                                  None if counts is None else counts[name], dampening, solver)
    return Mask(kept)


def _prune_layer(name: str, layer: nn.Module, hessian: torch.Tensor, live: torch.Tensor,
                 pattern: Pattern, count: int | None, dampening: float, solver: Solver
                 ) -> torch.Tensor:
    """Reconstruct one layer in place under ``pattern`` with ``solver``; returns its keep-mask."""
    weight = layer.weight
    matrix, live2d = weight.detach().reshape(weight.shape[0], -1), live.reshape(weight.shape[0], -1)
    order = torch.arange(matrix.shape[1])
    options: dict = {}
    if pattern.kind == "nm":
        pattern.select(name, torch.zeros(weight.shape), 0)  # the pattern's own divisibility error
        options["nm"] = (pattern.n, pattern.m)
        if weight.dim() > 2:  # group the input channels of each kernel position together
            order = order.view(weight.shape[1], -1).t().reshape(-1)
    elif pattern.kind == "unstructured":
        options.update(keep=count, every_row=pattern.every_row)
    else:
        scores = torch.where(live, layer_scores(weight, hessian, dampening), -torch.inf)
        options["fixed"] = (pattern.select(name, scores, count) & live).reshape_as(live2d)
    full = torch.cat([order, torch.arange(order.numel(), hessian.shape[0])])
    new, keep, bias = solver(
        matrix[:, order], hessian[full][:, full], live=live2d[:, order],
        bias=layer.bias if hessian.shape[0] > matrix.shape[1] else None, **options)
    back = torch.argsort(order)
    weight.copy_(new[:, back].reshape(weight.shape))
    if bias is not None:
        layer.bias.copy_(bias)
    return keep[:, back].reshape(weight.shape).to(live.device)


def calibration_inputs(context: Context, criterion: str) -> list[torch.Tensor]:
    """The inputs of the context's batches; PruningError naming ``criterion`` when there are
    none."""
    if not context.batches:
        raise PruningError(f"criterion {criterion!r} needs data: pass data= (batches of (inputs, "
                           "targets)); their inputs calibrate the layer-wise reconstruction")
    return [x for x, _ in context.batches]


def layerwise_scores(model: nn.Module, names: Sequence[str], context: Context, *,
                     criterion: str, dampening: float, bias: bool) -> Scores:
    """OBS saliencies ``w^2 / [H^-1]_qq`` of every weight of the layers ``names`` (the
    allocation's scores); their input Hessians are left in ``context.cache`` for the solve."""
    layers = {n: layer_of(model, n) for n in names}
    found = hessians(model, layers, calibration_inputs(context, criterion), bias=bias)
    context.cache[CACHE_KEY] = found
    return {n: layer_scores(layers[n].weight, found[n], dampening) for n in names}


@dataclass(frozen=True)
class SparseGPT:
    """SparseGPT's column pass (Frantar & Alistarh, ICML 2023) as a criterion, with settings.

    ``dampening``: ``lambda`` relative to the mean Hessian diagonal (SparseGPT's 1%).
    ``block``: columns per lazy-update block. ``sequential``: feed each layer the outputs of the
    already pruned layers before it, after a least-squares refit of the layer to the original
    network's outputs. ``bias``: let the biases take part in the reconstruction. The final
    per-row least-squares refit on the chosen support is always on (:func:`reconstruct`'s
    ``refit``). The allocation ranks the OBS saliencies ``w^2 / [H^-1]_qq`` of the unpruned
    model; the solver then fills each layer's count.
    """

    dampening: float = 0.01
    block: int = 128
    sequential: bool = True
    bias: bool = True

    def score(self, model: nn.Module, names: Sequence[str], context: Context) -> Scores:
        """OBS saliencies per layer; the Hessians are kept for :meth:`solve`."""
        return layerwise_scores(model, names, context, criterion="sparsegpt",
                                dampening=self.dampening, bias=self.bias)

    def solve(self, model: nn.Module, current: Mask, counts: dict[str, int], pattern: Pattern,
              context: Context) -> Mask:
        """Reconstruct every layer to its count under ``pattern``."""
        return prune_layers(model, current, pattern, calibration_inputs(context, "sparsegpt"),
                            counts=counts, sequential=self.sequential, dampening=self.dampening,
                            block=self.block, bias=self.bias,
                            known=context.cache.pop(CACHE_KEY, None))

    def criterion(self, name: str = "sparsegpt") -> Criterion:
        """This configuration as a :class:`Criterion` for :func:`prunescope.prune`."""
        return Criterion(name, self.score, needs_data=True, solve=self.solve)


CRITERION = SparseGPT().criterion()
"""The registered ``sparsegpt`` criterion, with the default settings."""
