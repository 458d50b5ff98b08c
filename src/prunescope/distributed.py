"""Multi-process data-parallel training on PyTorch's own distributed engine.

Launch any prunescope command with ``torchrun``::

    torchrun --standalone --nproc_per_node=2 -m prunescope run recipes/gmp.yaml

Each process reads the same data in the same shuffled order (the shuffling generator is seeded
identically) and trains on its share of every global batch; gradients are summed across
processes with ``all_reduce`` after scaling each local loss by its share of the batch, so every
step applies exactly the gradient of the global batch, and the weights (and therefore every
mask computed from them) stay identical on all ranks. Parameter names are untouched (no DDP
wrapper), so masks keep working. Only rank 0 writes files and prints; the others read what rank
0 wrote where they need to (resume).

Batch-norm statistics are computed per process, as with DDP's default. On GPUs the backend is
NCCL (``auto``, the default, picks it for a CUDA device and gloo otherwise) and each process
uses the GPU of its ``LOCAL_RANK``; the few numbers exchanged besides gradients (epoch totals,
masks) travel on that device too, as NCCL requires.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from prunescope.errors import ConfigError

BACKENDS = ("auto", "gloo", "nccl", "mpi")
_DEVICE = torch.device("cpu")  # where collectives' tensors live (the GPU under NCCL)


def requested() -> bool:
    """True when launched by torchrun (or any launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_FINISHED_RANK = 0  # this process's rank after teardown()


def rank() -> int:
    return dist.get_rank() if active() else _FINISHED_RANK


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Only rank 0 writes files and prints."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """This process's device: under torchrun a bare ``cuda`` becomes ``cuda:<LOCAL_RANK>``."""
    if device.type == "cuda" and device.index is None and requested():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def setup(backend: str = "auto", device: torch.device | None = None) -> None:
    """Join the process group described by torchrun's environment, if any.

    ``auto`` is NCCL for a CUDA ``device`` and gloo otherwise. Raises ConfigError when
    ``backend`` is unknown or not available in this PyTorch build or on this machine (e.g.
    ``nccl`` without a GPU).
    """
    global _DEVICE
    if not requested() or active():
        return
    device = device or torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    available = {"gloo": dist.is_gloo_available, "nccl": dist.is_nccl_available,
                 "mpi": dist.is_mpi_available}
    if backend not in available:
        raise ConfigError(f"unknown distributed backend {backend!r}; choose one of {BACKENDS}")
    if not available[backend]() or (backend == "nccl" and not torch.cuda.is_available()):
        raise ConfigError(
            f"distributed backend {backend!r} is not available here; use 'gloo' on CPU "
            "(--set distributed.backend=gloo)"
        )
    if backend == "nccl":
        _DEVICE = local_device(device if device.type == "cuda" else torch.device("cuda"))
        torch.cuda.set_device(_DEVICE)
    dist.init_process_group(backend=backend)


def teardown() -> None:
    """Leave the process group (no-op when there is none); rank and world size are kept for
    the rest of the process, so rank 0 alone still prints the results."""
    global _FINISHED_RANK
    if active():
        _FINISHED_RANK = dist.get_rank()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if active():
        dist.barrier()


def shard(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's contiguous share of a global batch (the whole batch in one process)."""
    if not active():
        return inputs, targets
    bounds = torch.linspace(0, len(targets), world_size() + 1).round().long().tolist()
    start, stop = bounds[rank()], bounds[rank() + 1]
    return inputs[start:stop], targets[start:stop]


def all_reduce_gradients(model: nn.Module) -> None:
    """Sum every parameter's gradient over the processes, in one flat buffer."""
    if not active():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for param, grad in zip(params, grads, strict=True):
        count = grad.numel()
        param.grad = flat[offset:offset + count].view_as(grad).clone()
        offset += count


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over the processes (for logging totals)."""
    if not active():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_DEVICE)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_bool(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's bool tensors on every process (as new tensors; gloo sends them as uint8).

    Masks are computed identically everywhere from identical weights; this makes it certain.
    """
    if not active():
        return tensors
    shared = {}
    for name, tensor in tensors.items():
        buffer = tensor.to(device=_DEVICE, dtype=torch.uint8)
        dist.broadcast(buffer, src=0)
        shared[name] = buffer.bool().to(tensor.device)
    return shared
