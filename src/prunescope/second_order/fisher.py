"""Block-diagonal empirical Fisher matrices and their inverses (WoodFisher).

Singh & Alistarh (NeurIPS 2020), "WoodFisher: Efficient Second-Order Approximation for Neural
Network Compression": the loss Hessian is approximated by the empirical Fisher
``F = 1/N sum_n g_n g_n^T + lambda I`` of ``N`` per-sample gradients ``g_n``, kept block-diagonal
so that its inverse fits in memory. Here each target tensor is flattened and cut into contiguous
blocks of ``block_size`` weights; a tensor's blocks cost ``numel * block_size`` numbers, so the
whole inverse costs ``block_size`` times the model's size. Weights already pruned are held at zero:
their gradient coordinates are dropped, which decouples them from every other weight.

Dampening is relative: ``lambda = dampening * mean(diag F)`` over all target tensors, one value
for the whole (block-diagonal) matrix, so scores stay comparable across tensors; a tiny floor
keeps the Fisher invertible where every gradient vanishes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from prunescope.errors import PruningError
from prunescope.targets import parameters

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AUTO_BLOCK_CAP = 128
_FLOOR = 1e-12
PER_SAMPLE_CHUNK = 128  # examples per vmap call of per_sample_gradients


def block_size_for(name: str, numel: int, block_size: int | None) -> int:
    """The block size used for a tensor of ``numel`` weights.

    ``None`` picks the largest divisor of ``numel`` that is at most 128; an explicit size must
    divide ``numel`` (PruningError otherwise, naming the tensor and a size that would work).
    """
    if block_size is None:
        return max(d for d in range(1, min(numel, AUTO_BLOCK_CAP) + 1) if numel % d == 0)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise PruningError(f"woodfisher block size must be a positive integer, got {block_size!r}")
    if numel % block_size:
        fits = block_size_for(name, numel, None)
        raise PruningError(
            f"woodfisher block size {block_size} does not divide {name!r} ({numel} weights); "
            f"choose a size that divides every target tensor (e.g. {fits}) or block_size=None"
        )
    return block_size


def available_memory() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable`` on Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(sizes: dict[str, tuple[int, int]], limit: int | None = None, *,
                 chunk: int | None = None, label: str = "woodfisher",
                 advice: str = "prune fewer tensors at once") -> None:
    """Raise PruningError, before allocating anything, when the Fisher work would not fit.

    ``sizes`` maps tensor names to ``(numel, block_size)``. Counted: every tensor's Fisher
    blocks (float32) and inverse blocks (float64), which coexist until the weights are updated;
    the largest tensor's float64 factorisation work space (a copy, the Cholesky factor and a
    solve's output); and one chunk of per-sample gradients of all targets with its masked copy.
    ``label`` names the caller and ``advice`` the second remedy in the message.
    """
    limit = available_memory() if limit is None else limit
    chunk = PER_SAMPLE_CHUNK if chunk is None else chunk
    kept = sum(n * b * 12 for n, b in sizes.values())
    workspace = max(n * b * 24 for n, b in sizes.values())
    gradients = 2 * chunk * sum(n for n, _ in sizes.values()) * 4
    needed = kept + workspace + gradients
    if needed > limit:
        largest = max(b for _, b in sizes.values())
        raise PruningError(
            f"{label} with block size {largest} needs {needed / 2**30:.2f} GiB but "
            f"{limit / 2**30:.2f} GiB is available; choose a smaller block size or {advice}"
        )


def per_sample_gradients(model: nn.Module, names: Sequence[str], batches: Sequence[Batch],
                         loss_fn: LossFn, *, chunk: int | None = None
                         ) -> Iterator[dict[str, torch.Tensor]]:
    """Per-example loss gradients ``{name: [n, *shape]}``, ``chunk`` examples at a time.

    Computed with ``torch.func`` (vmap of grad) on the model in eval mode, so batch norm uses
    its running statistics and dropout is off; the model itself is not changed.
    """
    params = parameters(model)
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    tied = {id(params[n]) for n in names}  # a target's tied aliases follow it (tie_weights)
    frozen = {n: p.detach() for n, p in params.items() if id(p) not in tied}
    params = {n: params[n].detach() for n in names}
    was_training = model.training
    model.eval()

    def loss(targets: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        state = {**frozen, **targets, **buffers}
        return loss_fn(functional_call(model, state, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    chunk = PER_SAMPLE_CHUNK if chunk is None else chunk
    try:
        for inputs, targets in batches:
            for start in range(0, len(inputs), chunk):
                x, y = inputs[start:start + chunk], targets[start:start + chunk]
                yield per_example({n: params[n] for n in names}, x, y)
    finally:
        model.train(was_training)


def empirical_fisher(model: nn.Module, keep: Mapping[str, torch.Tensor],
                     blocks: Mapping[str, int], batches: Sequence[Batch], loss_fn: LossFn
                     ) -> dict[str, torch.Tensor]:
    """``1/N sum_n g_n g_n^T`` per tensor, as ``[numel / block, block, block]`` diagonal blocks.

    ``keep`` is the current mask: the gradient coordinates of pruned weights are zeroed, so
    those weights are decoupled from the rest (they are held at zero). Accumulated in float32
    one chunk of per-sample gradients at a time.
    """
    names = list(keep)
    params = parameters(model)
    totals = {n: torch.zeros(params[n].numel() // blocks[n], blocks[n], blocks[n]) for n in names}
    count = 0
    for chunk in per_sample_gradients(model, names, batches, loss_fn):
        for name in names:
            flat = chunk[name].reshape(chunk[name].shape[0], -1).float().cpu()
            flat = flat * keep[name].reshape(1, -1).to(flat)
            g = flat.reshape(flat.shape[0], -1, blocks[name]).transpose(0, 1)
            totals[name].baddbmm_(g.transpose(1, 2), g)
        count += next(iter(chunk.values())).shape[0]
    if count == 0:
        raise PruningError("woodfisher needs gradient samples: pass data= with at least one batch")
    return {n: total.div_(count) for n, total in totals.items()}


def dampened_inverse(blocks: torch.Tensor, damp: float) -> torch.Tensor:
    """``(F + damp I)^-1`` blockwise, in float64."""
    fisher = blocks.double()
    fisher.diagonal(dim1=1, dim2=2).add_(damp + _FLOOR)
    factor, info = torch.linalg.cholesky_ex(fisher)
    if int(info.max()) > 0:
        raise PruningError(f"the Fisher blocks are not positive definite with dampening {damp}; "
                           "raise the dampening")
    return inverse_from_factor(factor)


def mean_diagonal(fisher: Mapping[str, torch.Tensor]) -> float:
    """Mean of the Fisher diagonal over every block of every tensor (the dampening's unit)."""
    total = sum(float(f.diagonal(dim1=1, dim2=2).sum()) for f in fisher.values())
    return total / sum(f.shape[0] * f.shape[1] for f in fisher.values())


def inverse_from_factor(factor: torch.Tensor) -> torch.Tensor:
    """``A^-1`` from the lower Cholesky factor of ``A`` (batched); ``cholesky_solve`` against
    the identity, several times faster on CPU than ``torch.cholesky_inverse``."""
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    return torch.cholesky_solve(eye.expand(factor.shape), factor)
