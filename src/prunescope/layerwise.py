"""One-shot pruning of large models one block at a time (SparseGPT's sequential engine).

Frantar & Alistarh (ICML 2023), "SparseGPT", and Sun et al. (ICLR 2024), "Wanda", prune a
transformer block by block: the inputs of the first block are captured for every calibration
batch; then each block in turn is run on its current inputs while hooks on its target layers
collect their input statistics, its layers are pruned, and the now pruned block is run again on
the same inputs to give the next block its inputs. So every layer is calibrated on the
activations of the network pruned so far, and the memory beyond the model is the calibration
activations plus one block's statistics, never every layer's Hessian.

Solvers (every layer gets the same ``sparsity``; under ``N:M`` each group of M consecutive
inputs keeps N):

- ``magnitude``: the largest ``|w|`` of the layer (no activations needed);
- ``wanda``: score ``|W_ij| * ||X_j||_2``, compared within each output row (each row keeps
  ``round((1 - s) * cols)``);
- ``sparsegpt``: :func:`prunescope.second_order.obc.reconstruct` on ``H = X X^T / n`` (no bias
  column, no refit, as published), which also updates the kept weights. Its unstructured count
  is split over the column blocks by the initial scores (see that module).

``token_masks`` (one ``[N, L]`` per batch) restrict the statistics to the positions that count:
of a layer input ``[N, L, D]`` only the rows where the mask is set enter ``H`` or the norms.
Weights that are already zero (a model pruned before) stay pruned: a layer keeps at most its
nonzero weights.

Assumptions of the block mode: the blocks are called once each, in their order, each with the
hidden state as its first positional argument (or ``hidden_states=``) and the same other
arguments as the first one (true of BERT, GPT-2 and LLaMA-style stacks); a block returns the
hidden state or a tuple starting with it. A model with no ``nn.ModuleList`` holding targets (a
plain MLP or CNN) is pruned one target layer at a time in model (parameter) order, each from
full-model forwards of the network pruned so far: as many forwards per batch as targets.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence

import torch
from torch import nn
from tqdm import tqdm

from prunescope.errors import ConfigError, PruningError
from prunescope.mask import Mask
from prunescope.patterns import Pattern, parse_pattern
from prunescope.second_order.obc import input_rows, layer_of, reconstruct

SOLVERS = ("magnitude", "wanda", "sparsegpt")
logger = logging.getLogger(__name__)


class _Captured(Exception):
    """Raised by the hook that captured a block's inputs, to stop the forward there."""


@torch.no_grad()
def prune_blocks(model: nn.Module, inputs: Sequence[torch.Tensor], targets: Sequence[str], *,
                 solver: str, sparsity: float | None = None,
                 pattern: str | Pattern = "unstructured", blocks: str | None = None,
                 token_masks: Sequence[torch.Tensor] | None = None, dampening: float = 0.01,
                 column_block: int = 128, progress: bool | None = None) -> Mask:
    """Prune the ``targets`` (weights of Linear / ungrouped Conv2d layers) of ``model`` in place.

    Each calibration batch ``x`` of ``inputs`` is passed as ``model(x)`` (in eval mode; every
    module's mode is restored after). ``blocks`` names the ``nn.ModuleList`` of blocks; None
    takes the one holding the most targets, or, when none holds any, prunes layer by layer (see
    the module docstring). ``sparsity`` is the fraction of each layer's weights removed (unused
    under N:M). ``dampening`` and ``column_block`` are SparseGPT's lambda (relative to the mean
    Hessian diagonal) and lazy-update block. ``progress``: a bar per block on stderr (None: when
    stderr is a terminal). Returns the keep-mask over exactly ``targets``; pruned weights are
    zero (and kept ones updated, for sparsegpt).
    """
    pattern = _check_request(solver, sparsity, pattern, inputs, token_masks, targets)
    layers = _layers(model, targets, pattern)
    block_list, steps = _plan(model, list(layers), blocks)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        prune = _Pruner(layers, solver, pattern, sparsity, dampening, column_block)
        bar = tqdm(total=sum(1 for s in steps if s), desc=f"prune {solver}", leave=False,
                   disable=not (sys.stderr.isatty() if progress is None else progress),
                   file=sys.stderr, dynamic_ncols=True)
        with bar:
            if block_list is None:
                _layer_by_layer(model, inputs, token_masks, steps, prune, bar)
            else:
                _sequential(model, inputs, token_masks, block_list, steps, prune, bar)
    finally:
        for module, mode in modes.items():
            module.training = mode
    return Mask({name: prune.kept[name] for name in targets})


# -- the request -----------------------------------------------------------------------------
def _check_request(solver, sparsity, pattern, inputs, token_masks, targets) -> Pattern:
    """The parsed pattern; ConfigError / PruningError for a request that cannot run."""
    if solver not in SOLVERS:
        raise ConfigError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    pattern = pattern if isinstance(pattern, Pattern) else parse_pattern(pattern)
    if pattern.kind not in ("unstructured", "nm"):
        raise ConfigError(f"block-wise pruning supports 'unstructured' and 'N:M' patterns, "
                          f"not {str(pattern)!r}")
    if pattern.kind == "unstructured" and (
            not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0):
        raise ConfigError(f"sparsity must be a number in [0, 1) for unstructured pruning, "
                          f"got {sparsity!r}")
    if not targets:
        raise PruningError("no targets to prune: pass the names of Linear/Conv2d weights")
    if not inputs:
        raise PruningError("block-wise pruning needs calibration inputs: pass at least one batch")
    if token_masks is not None and len(token_masks) != len(inputs):
        raise ConfigError(f"token_masks has {len(token_masks)} entries for {len(inputs)} "
                          "calibration batches; pass one [N, L] mask per batch")
    return pattern


def _layers(model: nn.Module, targets: Sequence[str], pattern: Pattern) -> dict[str, nn.Module]:
    """The target layers in model (parameter) order; errors for names that cannot be pruned."""
    order = {n: i for i, (n, _) in enumerate(model.named_parameters(remove_duplicate=False))}
    missing = [n for n in targets if n not in order]
    if missing:
        raise PruningError(f"the model has no parameter {missing[0]!r}; check the target names")
    layers = {n: layer_of(model, n) for n in sorted(set(targets), key=order.__getitem__)}
    if pattern.kind == "nm":
        for name, layer in layers.items():  # the pattern's own one-line divisibility error
            pattern.select(name, torch.zeros(layer.weight.shape), 0)
    return layers


def _plan(model: nn.Module, names: list[str], blocks: str | None
          ) -> tuple[nn.ModuleList | None, list[list[str]]]:
    """The ModuleList of blocks and the targets of each block; or (None, one step per layer)."""
    lists = {n: m for n, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    if blocks is None:
        held = {n: len(_inside(n, names)) for n in lists}
        blocks = max(held, key=held.__getitem__, default=None)  # first = outermost on ties
        if blocks is None or held[blocks] == 0:
            return None, [[n] for n in names]
    elif not isinstance(lists.get(blocks), nn.ModuleList):
        raise ConfigError(f"blocks={blocks!r} is not an nn.ModuleList of the model; name one, "
                          "e.g. 'bert.encoder.layer', or pass None")
    prefix = f"{blocks}." if blocks else ""
    steps = [_inside(f"{prefix}{key}", names) for key, _ in lists[blocks].named_children()]
    placed = {n for step in steps for n in step}
    outside = [n for n in names if n not in placed]
    if outside:
        raise PruningError(f"target {outside[0]!r} is not inside the blocks {blocks!r}; exclude "
                           "it or name blocks= a ModuleList holding every target")
    return lists[blocks], steps


def _inside(module: str, names: list[str]) -> list[str]:
    return [n for n in names if not module or n.startswith(module + ".")]


# -- statistics ------------------------------------------------------------------------------
class _Statistics:
    """Running input statistics of one layer: ``sum X X^T`` (sparsegpt) or ``sum_j x_j^2``
    (wanda), float64, over the rows (positions) the token mask keeps."""

    def __init__(self, name: str, layer: nn.Module, solver: str) -> None:
        self.name, self.layer, self.solver = name, layer, solver
        self.total: torch.Tensor | None = None
        self.rows = 0

    def add(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        if token_mask is not None:
            if x.dim() != 3 or x.shape[:2] != token_mask.shape:
                raise PruningError(
                    f"token mask of shape {tuple(token_mask.shape)} does not fit the input "
                    f"{tuple(x.shape)} of {self.name!r}; token_masks need layer inputs [N, L, D]")
            x = x[token_mask.to(x.device).bool()]
        rows = input_rows(self.layer, x.detach(), bias=False)
        part = rows.T @ rows if self.solver == "sparsegpt" else rows.square().sum(0)
        self.total = part if self.total is None else self.total + part
        self.rows += rows.shape[0]

    def value(self) -> torch.Tensor:
        """``H = X X^T / n`` (sparsegpt) or ``||X_j||_2`` per input column (wanda)."""
        if self.total is None:
            raise PruningError(f"layer {self.name!r} was not called on the calibration inputs; "
                               "exclude it")
        if self.rows == 0:
            raise PruningError(f"token_masks select no position for {self.name!r}; "
                               "pass masks that keep some tokens")
        return self.total / self.rows if self.solver == "sparsegpt" else self.total.sqrt()


def _hooked(names: list[str], prune: _Pruner, current: dict) -> tuple[dict, list]:
    """Statistics of ``names`` and the pre-hooks feeding them (``current["mask"]``: the token
    mask of the batch being run)."""
    stats = {n: _Statistics(n, prune.layers[n], prune.solver) for n in names}

    def hook(name: str):
        return lambda module, args: stats[name].add(args[0], current["mask"])

    handles = [prune.layers[n].register_forward_pre_hook(hook(n)) for n in names]
    return stats, handles


# -- the two drivers -------------------------------------------------------------------------
def _sequential(model, inputs, token_masks, block_list, steps, prune, bar) -> None:
    """Capture the first targeted block's inputs, then per block: statistics, prune, run."""
    targeted = [i for i, step in enumerate(steps) if step]
    first, last = targeted[0], targeted[-1]
    calls = _capture(model, block_list[first], inputs) if prune.needs_data else []
    for index in range(first, last + 1):
        block = block_list[index]
        if steps[index]:
            stats = _run_block(block, calls, token_masks, steps[index], prune)
            for name in steps[index]:  # each layer's statistics freed once it is pruned
                prune(name, stats.pop(name, None))
            bar.update()
        for number, (args, kwargs) in enumerate(calls if index < last else ()):
            calls[number] = _with_hidden((args, kwargs), _hidden_of(block(*args, **kwargs)))


def _capture(model: nn.Module, block: nn.Module, inputs) -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` of ``block`` for every batch, stopping each forward there."""
    calls: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        if not args and "hidden_states" not in kwargs:
            raise PruningError("the blocks take no positional input nor hidden_states=; "
                               "name other blocks= or prune layer by layer")
        calls.append((args, kwargs))
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for x in inputs:
            try:
                model(x)
            except _Captured:
                continue
            raise PruningError("the model's forward did not call the first pruned block; "
                               "name the blocks it runs with blocks=")
    finally:
        handle.remove()
    return calls


def _run_block(block, calls, token_masks, names, prune) -> dict[str, _Statistics]:
    """Run ``block`` on every captured call with statistics hooks on its ``names``."""
    if not prune.needs_data:
        return {}
    current: dict = {"mask": None}
    stats, handles = _hooked(names, prune, current)
    try:
        for number, (args, kwargs) in enumerate(calls):
            current["mask"] = None if token_masks is None else token_masks[number]
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _with_hidden(call: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _hidden_of(output) -> torch.Tensor:
    """The hidden state a block returned: the tensor, or the first element of a tuple."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise PruningError(f"a block returned {type(output).__name__}, not a tensor or a tuple "
                           "starting with one; name other blocks=")
    return output


def _layer_by_layer(model, inputs, token_masks, steps, prune, bar) -> None:
    """No blocks: each target layer from full-model forwards of the network pruned so far."""
    for names in steps:
        stats: dict[str, _Statistics] = {}
        if prune.needs_data:
            current: dict = {"mask": None}
            stats, handles = _hooked(names, prune, current)
            try:
                for number, x in enumerate(inputs):
                    current["mask"] = None if token_masks is None else token_masks[number]
                    model(x)
            finally:
                for handle in handles:
                    handle.remove()
        for name in names:
            prune(name, stats.get(name))
        bar.update()


# -- the solvers -----------------------------------------------------------------------------
class _Pruner:
    """Prunes one layer in place from its statistics; records the keep-masks in ``kept``."""

    def __init__(self, layers, solver, pattern, sparsity, dampening, column_block) -> None:
        self.layers, self.solver, self.pattern = layers, solver, pattern
        self.sparsity, self.dampening, self.column_block = sparsity, dampening, column_block
        self.needs_data = solver != "magnitude"
        self.kept: dict[str, torch.Tensor] = {}
        self.warned = False

    def __call__(self, name: str, stats: _Statistics | None) -> None:
        weight = self.layers[name].weight
        live = weight != 0
        if self.solver == "sparsegpt":
            self._warn_few(name, stats)
            new, keep = self._sparsegpt(name, weight, stats.value(), live)
            weight.copy_(new)
        else:
            magnitude = weight.detach().abs().double()
            if self.solver == "magnitude":
                keep = self._select(name, magnitude, live, per_row=False)
            else:
                norms = stats.value().reshape(weight.shape[1:])
                keep = self._select(name, magnitude * norms, live, per_row=True)
            weight.masked_fill_(~keep, 0.0)
        self.kept[name] = keep

    def _count(self, size: int) -> int:
        return math.floor((1.0 - self.sparsity) * size + 0.5)

    def _select(self, name, scores, live, *, per_row: bool) -> torch.Tensor:
        """Keep-mask by ``scores`` under the pattern: per output row (wanda) or per layer."""
        scores = torch.where(live, scores, -torch.inf)
        if self.pattern.kind == "nm":
            keep = self.pattern.select(name, scores, 0)
        elif per_row:
            matrix = scores.reshape(scores.shape[0], -1)
            order = torch.argsort(matrix, dim=1, descending=True, stable=True)
            keep = torch.zeros_like(matrix, dtype=torch.bool).scatter_(
                1, order[:, :self._count(matrix.shape[1])], True).view_as(scores)
        else:
            keep = self.pattern.select(name, scores, self._count(scores.numel()))
        return keep & live

    def _sparsegpt(self, name, weight, hessian, live) -> tuple[torch.Tensor, torch.Tensor]:
        """``obc.reconstruct`` on the CPU; N:M groups of a conv are the input channels at each
        kernel position (the columns are reordered for the solver and back)."""
        matrix = weight.detach().reshape(weight.shape[0], -1).cpu()
        live2d = live.reshape_as(matrix).cpu()
        hessian, order = hessian.cpu(), None
        if self.pattern.kind == "nm":
            options: dict = {"nm": (self.pattern.n, self.pattern.m)}
            if weight.dim() > 2:
                order = torch.arange(matrix.shape[1]).view(weight.shape[1], -1).t().reshape(-1)
                matrix, live2d = matrix[:, order], live2d[:, order]
                hessian = hessian[order][:, order]
        else:
            options = {"keep": min(self._count(matrix.numel()), int(live2d.sum())),
                       "every_row": self.pattern.every_row}
        new, keep, _ = reconstruct(matrix, hessian, live=live2d, dampening=self.dampening,
                                   block=self.column_block, bias=None, refit=False, **options)
        if order is not None:
            back = torch.argsort(order)
            new, keep = new[:, back], keep[:, back]
        return (new.reshape(weight.shape).to(weight.device),
                keep.reshape(weight.shape).to(weight.device))

    def _warn_few(self, name: str, stats: _Statistics | None) -> None:
        """One warning per call when a layer has fewer calibration rows than input columns."""
        columns = self.layers[name].weight[0].numel()
        if stats is not None and 0 < stats.rows < columns and not self.warned:
            self.warned = True
            logger.warning("sparsegpt: %r has %d input columns but only %d calibration rows "
                           "(tokens or positions); pass at least %d for a full-rank Hessian",
                           name, columns, stats.rows, columns)
