"""Where a run computes, and in which precision.

A run names its device once (``device:`` in a recipe, ``--device`` on the command line,
``Run(device=...)`` from Python): ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (the first
GPU when there is one, else the CPU). Models live on that device; data stays on the CPU and is
moved one batch at a time, so datasets larger than GPU memory need nothing special. A device
that is not there is a :class:`~prunescope.errors.ConfigError` before anything runs.

``precision`` selects automatic mixed precision for the forward and backward passes
(``torch.autocast``): ``fp32`` (none, the default), ``bf16`` (CPU and recent GPUs; no loss
scaling needed) or ``fp16`` (CUDA only, with a dynamic loss scaler). Weights, optimizer state and
masks stay in float32 either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from prunescope.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


def resolve(name: str | torch.device | None) -> torch.device:
    """The ``torch.device`` for ``name``; raises ConfigError for an unknown or absent device."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "cpu").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda":
        _check_cuda(device)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' is not available on this machine; use device: cpu")
    elif device.type != "cpu" and device.type not in ("cuda", "mps"):
        raise ConfigError(f"device type {device.type!r} is not supported; use cpu, cuda or mps")
    return device


def _check_cuda(device: torch.device) -> None:
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {str(device)!r} is not available: PyTorch sees no CUDA GPU on this machine "
            "(or this torch build has no CUDA); use device: cpu (--device cpu)"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"device {str(device)!r} is not available: this machine has {count} "
                          f"CUDA GPU(s), cuda:0 to cuda:{count - 1}")


def check_precision(precision: str, device: torch.device | None = None) -> None:
    """Raise ConfigError when ``precision`` is unknown or unusable on ``device``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device is not None and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device (its loss scaling is CUDA's); "
                          "use bf16 on the CPU")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16 (None otherwise: bf16 and fp32 need none)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for an empty model)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def batch_to(device: torch.device, inputs: torch.Tensor, targets: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(inputs, targets)`` batch on ``device`` (asynchronous copies to a GPU)."""
    non_blocking = device.type == "cuda"
    return (inputs.to(device, non_blocking=non_blocking),
            targets.to(device, non_blocking=non_blocking))


def batches_to(device: torch.device, batches: Iterable) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every ``(inputs, targets)`` batch of ``batches`` on ``device`` (e.g. scoring batches)."""
    return [batch_to(device, inputs, targets) for inputs, targets in batches]
