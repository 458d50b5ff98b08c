"""Effective sparsity: weights on no input-to-output path count as pruned.

Vysogorets & Kempe (JMLR 2023), "Connectivity Matters: Neural Network Pruning Through the Lens of
Effective Sparsity". A kept weight is *effective* when it lies on at least one path of kept
weights from an input to an output. For an MLP this is a forward reachability sweep from the
inputs and a backward sweep from the outputs; for convolutional and residual networks it is the
support of the SynFlow-style score of the linearised network: every target weight replaced by a
positive value where the mask keeps it and 0 where it does not, batch norm removed, biases zeroed,
activations made the identity and max-pooling replaced by average pooling of the same window, on
an all-ones input. All values are positive, so nothing cancels and a weight gets a nonzero
gradient exactly when some input reaches it and it reaches some output. Weights are normalised by
their fan-in and computed in double precision, so deep networks neither overflow nor underflow.

A model still carrying ``torch.nn.utils.prune``'s reparametrisation is analysed on a folded copy
(:func:`prunescope.interop.folded_copy`); the model itself is not changed.

Layers the mask does not cover (e.g. an excluded output layer) count as fully kept. Mask tensors
that are not Linear or Conv weights (say, biases chosen by an include glob) are reported with
their direct mask. Only the mask's tensors enter the sparsity figures.
"""

from __future__ import annotations

import torch
from torch import nn

from prunescope.errors import PruningError
from prunescope.interop import folded_copy
from prunescope.mask import Mask
from prunescope.targets import PRUNABLE_LAYERS, parameters

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
    nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Mish, nn.PReLU,
)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def analysable(model: nn.Module) -> bool:
    """Whether the path analysis applies: False for a model that says so with
    ``paths_analysable = False`` (a transformer: attention multiplies activations and its
    activations are functions, not modules, so the linearised network is not its paths)."""
    return getattr(model, "paths_analysable", True)


def effective_mask(model: nn.Module, mask: Mask,
                   input_shape: tuple[int, ...] | None = None) -> Mask:
    """The effective mask: kept weights that lie on an input-to-output path of kept weights.

    It is a subset of ``mask`` and idempotent (``effective_mask(effective_mask(m)) == it``).
    ``input_shape`` (without batch) defaults to ``model.input_shape``, which models built by
    ``prunescope.models.build`` carry.
    """
    mask.check(model)
    if not analysable(model):
        raise PruningError(f"effective sparsity is not defined for {type(model).__name__} "
                           "(see prunescope.connectivity.analysable); report direct sparsity")
    shape = _input_shape(model, input_shape)
    linear = _linearised(model, mask)
    params = parameters(linear)
    device = next(iter(params.values())).device
    output = linear(torch.ones((1, *shape), dtype=torch.float64, device=device))
    analysed = [n for n in mask if n in _layer_weights(model)]
    grads = torch.autograd.grad(output.sum(), [params[n] for n in analysed], allow_unused=True)
    reached = {
        name: (grad > 0).to(mask[name].device) if grad is not None
        else torch.zeros_like(mask[name])
        for name, grad in zip(analysed, grads, strict=True)
    }
    return Mask({n: mask[n] & reached[n] if n in reached else mask[n] for n in mask})


def effective_sparsity(model: nn.Module, mask: Mask, input_shape: tuple[int, ...] | None = None
                       ) -> float:
    """Global effective sparsity of ``mask`` on ``model`` (1 - effective kept / total)."""
    return effective_mask(model, mask, input_shape).sparsity


def layer_sparsities(model: nn.Module, mask: Mask, input_shape: tuple[int, ...] | None = None
                     ) -> dict[str, dict[str, float | None]]:
    """Per tensor: ``{"direct": ..., "effective": ...}`` sparsity (effective None where the
    model is not :func:`analysable`)."""
    direct = mask.sparsities()
    if not analysable(model):
        return {n: {"direct": s, "effective": None} for n, s in direct.items()}
    effective = effective_mask(model, mask, input_shape).sparsities()
    return {n: {"direct": s, "effective": effective[n]} for n, s in direct.items()}


def _layer_weights(model: nn.Module) -> set[str]:
    return {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules() if isinstance(module, PRUNABLE_LAYERS)
    }


def _input_shape(model: nn.Module, given: tuple[int, ...] | None) -> tuple[int, ...]:
    shape = given or getattr(model, "input_shape", None)
    if shape is not None:
        return tuple(shape)
    first = next((m for m in model.modules() if isinstance(m, PRUNABLE_LAYERS)), None)
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    raise PruningError(
        "cannot infer the model's input shape; pass input_shape=(C, H, W) "
        "(models from prunescope.models.build carry it)"
    )


def _linearised(model: nn.Module, mask: Mask) -> nn.Module:
    """A double-precision copy whose forward pass only propagates path connectivity."""
    linear = folded_copy(model).double().eval()
    _swap_modules(linear)
    with torch.no_grad():
        for module in linear.modules():
            if isinstance(module, PRUNABLE_LAYERS):
                fan_in = module.weight[0].numel()
                module.weight.fill_(1.0 / fan_in)
                if module.bias is not None:
                    module.bias.zero_()
        params = parameters(linear)
        for name, keep in mask.items():
            params[name].mul_(keep.to(params[name].device, torch.float64))
    for param in linear.parameters():
        param.requires_grad_(True)
    return linear


def _swap_modules(root: nn.Module) -> None:
    """Replace norms and activations by identity and max- by average-pooling, in place."""
    for name, child in root.named_children():
        if isinstance(child, (*_NORMS, *_ACTIVATIONS, nn.Dropout)):
            setattr(root, name, nn.Identity())
        elif isinstance(child, nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d):
            setattr(root, name, _average_pool(child))
        elif isinstance(child, nn.AdaptiveMaxPool1d | nn.AdaptiveMaxPool2d | nn.AdaptiveMaxPool3d):
            dims = {nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2}.get(type(child), 3)
            pool = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[dims - 1]
            setattr(root, name, pool(child.output_size))
        else:
            _swap_modules(child)


def _average_pool(pool: nn.Module) -> nn.Module:
    if pool.dilation not in (1, (1,), (1, 1), (1, 1, 1)):
        raise PruningError("effective sparsity does not support dilated max-pooling")
    cls = {nn.MaxPool1d: nn.AvgPool1d, nn.MaxPool2d: nn.AvgPool2d}.get(type(pool), nn.AvgPool3d)
    return cls(pool.kernel_size, pool.stride, pool.padding, ceil_mode=pool.ceil_mode,
               count_include_pad=False)
