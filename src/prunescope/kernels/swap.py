"""to_sparse / to_dense: swap a model's masked layers for sparse ones where that is faster.

:func:`to_sparse` times, on this machine and for the shapes the model really sees, each masked
``nn.Linear``/``nn.Conv2d`` dense and sparse (forward alone for inference; for training forward +
backward, and for the dense layer also the mask hold it then needs every step: masking its
gradient and re-zeroing its weight; interleaved rounds, the speedup the smaller of the fastest
runs' ratio and the median of the per-round ratios), and replaces a layer by its
:class:`~prunescope.kernels.SparseLinear`/:class:`~prunescope.kernels.SparseConv2d` only when the
sparse one is at least ``min_speedup`` times faster, so a model is never made slower by it. The
choice is printed as a table and returned as a :class:`SwapPlan`, whose ``residual`` mask covers the
layers left dense (hold it with :class:`prunescope.sparsifier.MaskHold`; the swapped layers hold
their own mask). :func:`to_dense` puts plain layers back.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from prunescope.kernels.build import backend
from prunescope.kernels.modules import (
    FAST_DTYPES,
    KernelError,
    SparseConv2d,
    SparseLinear,
    _SparseLayer,
)
from prunescope.mask import Mask

Example = torch.Tensor | tuple | list | Mapping
"""Model inputs: one tensor (``model(x)``), a tuple/list of positional inputs (``model(*x)``) or
a mapping of keyword inputs (``model(**x)``, e.g. a tokenizer's ``input_ids`` and
``attention_mask``)."""

SPARSE_TYPES: dict[type[nn.Module], type[_SparseLayer]] = {
    nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d,
}


@dataclass(frozen=True)
class LayerChoice:
    """The decision for one masked tensor: ``sparse`` is True when its layer was swapped.
    ``batch`` is the rows the layer computes per call: a Conv2d's images; for a Linear the
    product of its input's leading dimensions (batch x tokens for a transformer's layers)."""

    name: str
    shape: str
    batch: int | None
    sparsity: float
    dense_ms: float | None
    sparse_ms: float | None
    sparse: bool
    reason: str

    @property
    def speedup(self) -> float | None:
        if self.dense_ms is None or not self.sparse_ms:
            return None
        return self.dense_ms / self.sparse_ms


@dataclass
class SwapPlan:
    """What :func:`to_sparse` did. ``residual`` masks the layers left dense (None if none)."""

    layers: list[LayerChoice]
    training: bool
    kernels: str
    threads: int
    residual: Mask | None = field(default=None)

    @property
    def swapped(self) -> list[str]:
        """Names of the modules now sparse."""
        return [c.name.rpartition(".")[0] for c in self.layers if c.sparse]

    def table(self) -> str:
        """The decisions as a fixed-width table (what :func:`to_sparse` prints)."""
        use, what = ("training", "forward+backward") if self.training else ("inference", "forward")
        width = max([24] + [len(c.name.rpartition(".")[0]) for c in self.layers])
        lines = [f"prunescope.kernels: sparse layers for {use} ({self.kernels} kernels, "
                 f"{self.threads} threads, {what} per batch)",
                 f"{'layer':<{width}} {'shape':<24} {'batch':>5} {'sparsity':>8} {'dense ms':>9} "
                 f"{'sparse ms':>9} {'speedup':>7}  choice"]
        for c in self.layers:
            speed = "" if c.speedup is None else f"{c.speedup:.1f}x"
            lines.append(f"{c.name.rpartition('.')[0]:<{width}} {c.shape:<24} "
                         f"{_fmt(c.batch, 'd'):>5} "
                         f"{c.sparsity:>8.4f} {_fmt(c.dense_ms, '.3f'):>9} "
                         f"{_fmt(c.sparse_ms, '.3f'):>9} {speed:>7}  "
                         f"{'sparse' if c.sparse else 'dense'} ({c.reason})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def to_sparse(model: nn.Module, mask: Mask, example: Example | None = None, *,
              training: bool = True, batch_size: int = 128, min_speedup: float = 1.1,
              repeats: int = 7, layers: Collection[str] | None = None, verbose: bool = True,
              log: Callable[[str], object] = print) -> SwapPlan:
    """Swap, in place, each layer of ``mask`` whose sparse version is measured faster.

    ``example`` is a batch of model inputs as used in the job (its shapes are what gets timed):
    a tensor, a tuple of positional inputs or a mapping of keyword inputs (a Hugging Face model's
    ``input_ids`` and ``attention_mask``); Linear layers may receive any number of leading
    dimensions (``[batch, tokens, features]``), timed at that shape. Without it Linear layers are
    timed at ``batch_size`` and Conv2d layers stay dense. Call it before building the optimizer
    (swapped layers have new parameters, ``values``). Layers already
    sparse are made dense first, so every decision is measured afresh. Layers that are not
    ``nn.Linear``/``nn.Conv2d``, not float32/float64 on the CPU, or when the fast kernels are
    unavailable, stay dense; the table says why. ``layers`` (module names) skips the timing and
    swaps exactly those, e.g. to resume a run with the layers it started with (the optimizer
    state fits only them). Raises PruningError when the mask does not fit.
    """
    to_dense(model)
    mask.check(model)
    unknown = sorted(set(layers or ()) - {name.rpartition(".")[0] for name in mask})
    if unknown:
        raise KernelError(f"layers= names {unknown[0]!r}, which the mask does not prune")
    chosen = backend()
    shapes = _input_shapes(model, mask, example)
    choices = []
    for name in mask:
        if layers is None:
            choice, sparse = _decide(model, name, mask[name], shapes, chosen, training=training,
                                     batch_size=batch_size, min_speedup=min_speedup,
                                     repeats=repeats)
        else:
            choice, sparse = _given(model, name, mask[name], layers)
        if sparse is not None:
            _replace(model, name.rpartition(".")[0], sparse)
        choices.append(choice)
    kept = {c.name: mask[c.name] for c in choices if not c.sparse}
    plan = SwapPlan(choices, training, chosen.name, torch.get_num_threads(),
                    Mask(kept) if kept else None)
    if verbose:
        log(plan.table())
    return plan


def to_dense(model: nn.Module) -> Mask | None:
    """Replace every sparse layer of ``model`` by its dense layer (zeros at pruned weights), in
    place; returns the mask of the layers converted (None if there were none)."""
    masks = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, _SparseLayer) and name:  # a sparse model itself: use .to_dense()
            masks[f"{name}.weight"] = module.mask.clone()
            _replace(model, name, module.to_dense())
    return Mask(masks) if masks else None


def _replace(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new.train(model.get_submodule(module_name).training)
    setattr(parent, child, new)


def _input_shapes(model: nn.Module, mask: Mask,
                  example: Example | None) -> dict[str, tuple[torch.Size, bool]]:
    """Shape of each masked layer's first input on ``example`` and whether it needs a gradient."""
    if example is None:
        return {}
    shapes: dict[str, tuple[torch.Size, bool]] = {}
    hooks = []
    for name in mask:
        module_name = name.rpartition(".")[0]

        def hook(_module, args, module_name=module_name):
            if module_name not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[module_name] = (args[0].shape, args[0].requires_grad)

        hooks.append(model.get_submodule(module_name).register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            call(model, example)
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()
    return shapes


def call(model: nn.Module, example: Example):
    """``model`` applied to ``example`` (see :data:`Example`)."""
    if isinstance(example, Mapping):
        return model(**example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    return model(example)


def _rows(layer: nn.Module, input_shape: torch.Size) -> int:
    """Rows one call computes: a Linear's product of leading dims, a Conv2d's batch."""
    if isinstance(layer, nn.Linear):
        return math.prod(input_shape[:-1])
    return int(input_shape[0]) if len(input_shape) == 4 else 1


def _decide(model: nn.Module, name: str, keep: torch.Tensor, shapes, chosen, *, training: bool,
            batch_size: int, min_speedup: float,
            repeats: int) -> tuple[LayerChoice, nn.Module | None]:
    module_name, _, attr = name.rpartition(".")
    layer = model.get_submodule(module_name)
    sparsity = 1.0 - int(keep.count_nonzero()) / keep.numel()
    shape = _describe(layer)

    def stay(reason: str, batch=None, dense_ms=None, sparse_ms=None) -> tuple[LayerChoice, None]:
        return LayerChoice(name, shape, batch, sparsity, dense_ms, sparse_ms, False, reason), None

    kind = SPARSE_TYPES.get(type(layer))
    if kind is None or attr != "weight":
        return stay(f"no sparse kernel for {type(layer).__name__}.{attr}")
    if not module_name:
        return stay("the layer is the model itself; wrap it (e.g. in nn.Sequential) to swap it")
    if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
        return stay(f"padding_mode={layer.padding_mode!r}")
    if layer.weight.dtype not in FAST_DTYPES or layer.weight.device.type != "cpu":
        return stay(f"kernels run float32/float64 on the CPU, not {layer.weight.dtype} "
                    f"on {layer.weight.device.type}")
    if not chosen.fast:
        return stay(f"no fast kernels: {chosen.reason}")
    if module_name in shapes:
        input_shape, needs_grad = shapes[module_name]
    elif not shapes and isinstance(layer, nn.Linear):
        input_shape, needs_grad = torch.Size((batch_size, layer.in_features)), True
    else:
        return stay("not reached by the example input" if shapes
                    else "give example= to time a Conv2d")
    batch = _rows(layer, input_shape)
    dense_ms, sparse_ms = _time_pair(layer, kind, keep, input_shape, needs_grad and training,
                                     training, repeats)
    if sparse_ms * min_speedup > dense_ms:
        return stay(f"not {min_speedup:g}x faster", batch, dense_ms, sparse_ms)
    choice = LayerChoice(name, shape, batch, sparsity, dense_ms, sparse_ms, True, "faster")
    return choice, kind.from_dense(layer, keep)


def _given(model: nn.Module, name: str, keep: torch.Tensor,
           layers: Collection[str]) -> tuple[LayerChoice, nn.Module | None]:
    """The decision fixed by ``layers`` (no timing); refuses a layer with no sparse kernel."""
    module_name = name.rpartition(".")[0]
    layer = model.get_submodule(module_name)
    sparsity = 1.0 - int(keep.count_nonzero()) / keep.numel()
    swap = module_name in layers
    choice = LayerChoice(name, _describe(layer), None, sparsity, None, None, swap, "as given")
    if not swap:
        return choice, None
    kind = SPARSE_TYPES.get(type(layer))
    if kind is None or not name.endswith(".weight"):
        raise KernelError(f"{module_name} ({type(layer).__name__}) has no sparse kernel")
    return choice, kind.from_dense(layer, keep)


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return f"linear {layer.in_features}->{layer.out_features}"
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        stride = "" if tuple(layer.stride) == (1, 1) else f" s{layer.stride[0]}"
        return f"conv {layer.in_channels}->{layer.out_channels} {kh}x{kw}{stride}"
    return type(layer).__name__


def _time_pair(layer: nn.Module, kind: type[_SparseLayer], keep: torch.Tensor,
               input_shape: torch.Size, input_grad: bool, training: bool,
               repeats: int) -> tuple[float, float]:
    """Ms of the dense and the sparse layer on a random input, timed round-robin; in training
    the dense layer's time includes holding its mask, as
    :class:`~prunescope.sparsifier.MaskHold` does each step."""
    dense = copy.deepcopy(layer)
    sparse = kind.from_dense(dense, keep)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(input_shape, generator=generator, dtype=layer.weight.dtype)
    x.requires_grad_(input_grad)
    with torch.no_grad():
        grad = torch.randn_like(dense(x))
    hold = Mask({"weight": keep}) if training else None
    runs = {"dense": _runner(dense, x, grad, training, hold),
            "sparse": _runner(sparse, x, grad, training)}
    times = _interleaved(runs, repeats)
    return times["dense"], times["sparse"]


def _runner(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, training: bool,
            hold: Mask | None = None) -> Callable[[], None]:
    params = hold.resolve(layer) if hold is not None else {}

    def run() -> None:
        if training:
            layer(x).backward(grad)
            if hold is not None:
                hold.zero_grads_(params)
                hold.zero_(params)
            for param in layer.parameters():
                param.grad = None
            x.grad = None
        else:
            with torch.no_grad():
                layer(x)

    return run


def _interleaved(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Ms of ``dense`` and ``sparse`` from ``repeats`` interleaved rounds after two warm-up runs,
    which one goes first alternating from round to round. The sparse time returned is the more
    cautious of two estimates: the fastest run of each (the minimum estimates a layer's own cost
    even while other processes compete for the cores) and the median of the per-round ratios
    dense / sparse (a burst of other work slows both runs of a round alike), so a layer is
    swapped only when both say it is faster."""
    for run in runs.values():
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    dense, sparse = min(times["dense"]), min(times["sparse"])
    paired = statistics.median(d / max(s, 1e-9)
                               for d, s in zip(times["dense"], times["sparse"], strict=True))
    return {"dense": dense, "sparse": max(sparse, dense / max(paired, 1e-9))}
