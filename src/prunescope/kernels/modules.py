"""SparseLinear and SparseConv2d: layers that hold and compute with their kept weights only.

Built from a dense layer and its mask (:meth:`SparseLinear.from_dense`), a sparse layer keeps the
kept weights as one ordinary parameter ``values`` (so any optimizer, weight decay and gradient
clipping work on them unchanged) and the index structure of :mod:`prunescope.kernels.formats` as
buffers. Forward, input gradient and weight gradient touch kept weights only; the gradient of
``values`` is the masked dense weight gradient, entry for entry.

The state dict holds the *dense* ``weight`` (zeros at pruned places) and ``bias``, exactly the keys
of ``nn.Linear``/``nn.Conv2d``: a sparse model's checkpoint loads into the dense model and back.
Loading a dense weight with non-zeros outside the layer's mask is an error, never a silent drop.

Float32 and float64 on the CPU run the fast kernels (:mod:`prunescope.kernels.build`) through one
operator per layer whose autograd node is C++ (``torch.ops.prunescope_kernels.sparse_linear`` /
``sparse_conv2d``; a Linear call that needs no gradient runs a forward that keeps nothing for
backward); any other dtype or device, autocast, or a machine where the kernels could not
be built runs the reference path (:mod:`prunescope.kernels.reference`), which gives the same
results through dense ops (double backward included, which the kernels refuse).
"""

from __future__ import annotations

import torch
from torch import nn

from prunescope.errors import PrunescopeError
from prunescope.kernels import reference
from prunescope.kernels.build import backend
from prunescope.kernels.formats import compress, densify

FAST_DTYPES = (torch.float32, torch.float64)


class KernelError(PrunescopeError, ValueError):
    """A layer, mask or input the sparse layers cannot take (the message says what to do)."""


class _SparseLayer(nn.Module):
    """What both sparse layers share: values, structure buffers, mask, state-dict and export."""

    values: nn.Parameter
    mask: torch.Tensor

    def _init_sparse(self, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
                     groups: int) -> None:
        mask = _check_mask(weight, mask)
        compressed = compress(weight, mask, groups)
        self.values = nn.Parameter(compressed.values.clone())
        for name, tensor in compressed.structure().items():
            self.register_buffer(name, tensor, persistent=False)
        self.register_buffer("mask", mask.clone(), persistent=False)
        self.register_parameter(
            "bias", None if bias is None else nn.Parameter(bias.detach().clone()))

    @property
    def sparsity(self) -> float:
        """Fraction of pruned weights."""
        return 1.0 - self.values.numel() / self.mask.numel()

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense tensor (zeros at pruned places), detached."""
        return densify(self.values.detach(), self.mask)

    def _fast_ops(self, x: torch.Tensor):
        """The kernel operators if this call can use them, else None (reference path)."""
        if x.dtype != self.values.dtype:
            raise KernelError(
                f"{type(self).__name__} got a {x.dtype} input but holds {self.values.dtype} "
                "weights; convert one of them (e.g. model.to(x.dtype))"
            )
        chosen = backend()
        usable = (chosen.fast and x.dtype in FAST_DTYPES and x.device.type == "cpu"
                  and self.values.device.type == "cpu"
                  and not torch.is_autocast_enabled("cpu"))
        return chosen.ops if usable else None

    def _kernel_args(self) -> tuple:
        """values, bias, ptr, idx, cptr, cperm, crow: the operators' arguments after the input,
        read from the parameter and buffer dicts directly (``nn.Module.__getattr__`` costs a
        microsecond a name, a tenth of a small layer's kernel time)."""
        params, buffers = self._parameters, self._buffers
        return (params["values"], params["bias"], buffers["ptr"], buffers["idx"],
                buffers["cptr"], buffers["cperm"], buffers["crow"])

    # -- state dict: the dense layer's keys ------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        names = ["weight"] + (["bias"] if self.bias is not None else [])
        for name in names:
            if prefix + name not in state_dict:
                missing_keys.append(prefix + name)
        if prefix + "weight" in state_dict:
            self._load_weight(state_dict[prefix + "weight"], prefix + "weight", error_msgs)
        if self.bias is not None and prefix + "bias" in state_dict:
            bias = state_dict[prefix + "bias"]
            if bias.shape != self.bias.shape:
                error_msgs.append(f"size mismatch for {prefix}bias: copying a param with shape "
                                  f"{tuple(bias.shape)}, the layer has {tuple(self.bias.shape)}")
            else:
                with torch.no_grad():
                    self.bias.copy_(bias)
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and "." not in key[len(prefix):] \
                        and key[len(prefix):] not in names:
                    unexpected_keys.append(key)

    def _load_weight(self, weight: torch.Tensor, key: str, error_msgs: list[str]) -> None:
        if weight.shape != self.mask.shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                              f"{tuple(weight.shape)}, the layer has {tuple(self.mask.shape)}")
            return
        mask = self.mask.to(weight.device)
        if bool((weight[~mask] != 0).any()):
            error_msgs.append(
                f"{key} has non-zero weights where the sparse layer's mask prunes; load it into "
                "the dense model, or rebuild the sparse layers with prunescope.kernels.to_sparse"
            )
            return
        with torch.no_grad():
            self.values.copy_(weight[mask])


class SparseLinear(_SparseLayer):
    """``nn.Linear`` computing with its kept weights only (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise KernelError(f"a Linear weight is 2-d, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self._init_sparse(weight, mask, bias, groups=1)

    @classmethod
    def from_dense(cls, layer: nn.Linear, mask: torch.Tensor) -> SparseLinear:
        """The sparse layer keeping ``layer.weight[mask]`` (weights outside the mask dropped)."""
        if not isinstance(layer, nn.Linear):
            raise KernelError(f"SparseLinear.from_dense needs an nn.Linear, got {type(layer)}")
        return cls(layer.weight, mask, layer.bias)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the dense weight (zeros at pruned places)."""
        layer = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                          device=self.values.device, dtype=self.values.dtype)
        layer.load_state_dict(self.state_dict())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = self._fast_ops(x)
        if ops is None:
            return reference.linear(x, self.values, self.mask, self.bias)
        if x.shape[-1] != self.in_features:
            raise KernelError(f"SparseLinear expects {self.in_features} input features, "
                              f"got input of shape {tuple(x.shape)}")
        if x.dim() == 2:
            return ops.sparse_linear(x, *self._kernel_args())
        y = ops.sparse_linear(x.reshape(-1, self.in_features), *self._kernel_args())
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, sparsity={self.sparsity:.4f}")


class SparseConv2d(_SparseLayer):
    """``nn.Conv2d`` computing with its kept weights only: any stride, zero padding (symmetric,
    asymmetric, ``'same'``, ``'valid'``), dilation and groups. Other padding modes are refused."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None,
                 *, stride: tuple[int, int] = (1, 1), pads: tuple[int, int, int, int] = (0,) * 4,
                 dilation: tuple[int, int] = (1, 1), groups: int = 1) -> None:
        super().__init__()
        if weight.dim() != 4:
            raise KernelError(f"a Conv2d weight is 4-d, got shape {tuple(weight.shape)}")
        self.out_channels = weight.shape[0]
        self.in_channels = weight.shape[1] * groups
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.pads, self.dilation, self.groups = stride, pads, dilation, groups
        self._init_sparse(weight, mask, bias, groups)

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, mask: torch.Tensor) -> SparseConv2d:
        """The sparse layer keeping ``layer.weight[mask]``; refuses non-zero padding modes."""
        if not isinstance(layer, nn.Conv2d) or isinstance(layer, nn.ConvTranspose2d):
            raise KernelError(f"SparseConv2d.from_dense needs an nn.Conv2d, got {type(layer)}")
        if layer.padding_mode != "zeros":
            raise KernelError(f"Conv2d with padding_mode={layer.padding_mode!r} has no sparse "
                              "kernel; keep this layer dense")
        return cls(layer.weight, mask, layer.bias, stride=tuple(layer.stride),
                   pads=conv_pads(layer), dilation=tuple(layer.dilation), groups=layer.groups)

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the dense weight (asymmetric padding becomes ``'same'``)."""
        top, bottom, left, right = self.pads
        padding = (top, left) if (top, left) == (bottom, right) else "same"
        if padding == "same" and self.stride != (1, 1):
            raise KernelError(f"the padding {self.pads} with stride {self.stride} has no "
                              "nn.Conv2d equivalent")
        layer = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                          padding, self.dilation, self.groups, self.bias is not None,
                          device=self.values.device, dtype=self.values.dtype)
        if conv_pads(layer) != self.pads:
            raise KernelError(f"the padding {self.pads} has no nn.Conv2d equivalent")
        layer.load_state_dict(self.state_dict())
        return layer

    def geometry(self) -> list[int]:
        """The kernels' geometry list: C, K, kh, kw, stride, pads, dilation, groups."""
        return [self.in_channels, self.out_channels, *self.kernel_size, *self.stride, *self.pads,
                *self.dilation, self.groups]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = self._fast_ops(x)
        if ops is None:
            return reference.conv2d(x, self.values, self.mask, self.bias, stride=self.stride,
                                    pads=self.pads, dilation=self.dilation, groups=self.groups)
        if x.dim() == 3:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise KernelError(f"SparseConv2d expects [N, {self.in_channels}, H, W] input, got "
                              f"shape {tuple(x.shape)}")
        return ops.sparse_conv2d(x, *self._kernel_args(), self.geometry())

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, pads={self.pads}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}, "
                f"sparsity={self.sparsity:.4f}")


def conv_pads(layer: nn.Conv2d) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding of ``layer``, resolving 'same' and 'valid'."""
    if layer.padding == "valid":
        return (0, 0, 0, 0)
    if layer.padding == "same":
        pads = []
        for k, d in zip(layer.kernel_size, layer.dilation, strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = layer.padding
    return (ph, ph, pw, pw)


def _check_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise KernelError("the mask must be a bool tensor (True = keep)")
    if mask.shape != weight.shape:
        raise KernelError(f"the mask has shape {tuple(mask.shape)} but the weight has "
                          f"{tuple(weight.shape)}")
    return mask.detach().to(weight.device)


__all__ = ["KernelError", "SparseConv2d", "SparseLinear", "conv_pads"]
