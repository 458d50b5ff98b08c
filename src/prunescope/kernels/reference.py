"""The reference path: dense masked products, which every fast kernel is checked against.

Each function densifies the kept values (zeros at pruned weights) and calls PyTorch's dense op, so
its outputs and gradients (through autograd, double backward included) are by construction those
of the masked dense layer. The sparse modules run it when the fast kernels are unavailable, for
dtypes or devices the kernels do not support, and the tests and the benchmark compare with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prunescope.kernels.formats import densify


def linear(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` with the weight ``densify(values, mask)``."""
    return F.linear(x, densify(values, mask), bias)


def conv2d(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
           *, stride: tuple[int, int], pads: tuple[int, int, int, int],
           dilation: tuple[int, int], groups: int) -> torch.Tensor:
    """``F.conv2d`` with the weight ``densify(values, mask)``; ``pads`` = (top, bottom, left,
    right) zero padding."""
    top, bottom, left, right = pads
    weight = densify(values, mask)
    if top == bottom and left == right:
        return F.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
    return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride, 0, dilation, groups)
