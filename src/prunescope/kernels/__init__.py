"""Sparse compute: Linear and Conv2d layers that run on their kept weights only.

::

    from prunescope import kernels
    plan = kernels.to_sparse(model, mask, example=batch)   # swaps layers measured faster; prints
    optimizer = torch.optim.SGD(model.parameters(), ...)   # after the swap
    ...                                                    # train / infer as usual
    kernels.to_dense(model)                                # plain nn.Linear / nn.Conv2d again

* :class:`SparseLinear`, :class:`SparseConv2d` (modules): compressed weights, forward, input and
  weight gradient on kept weights only; dense state-dict keys.
* :mod:`~prunescope.kernels.reference`: the dense masked path every fast kernel is checked against.
* :mod:`~prunescope.kernels.build`: compiles the C++ kernels on first use (cached), picks the
  instruction set at run time, falls back to the reference path with a one-line warning.
* :func:`to_sparse`, :func:`to_dense` (:mod:`~prunescope.kernels.swap`): the swap rule.

See docs/kernels.md for the formats, the kernels and the measured speed.
"""

from prunescope.kernels.build import Backend, backend
from prunescope.kernels.modules import KernelError, SparseConv2d, SparseLinear
from prunescope.kernels.swap import LayerChoice, SwapPlan, to_dense, to_sparse

__all__ = [
    "Backend",
    "KernelError",
    "LayerChoice",
    "SparseConv2d",
    "SparseLinear",
    "SwapPlan",
    "backend",
    "to_dense",
    "to_sparse",
]
