"""Checkpoints: model weights, mask, optimizer and RNG state in one safetensors file.

Layout of the tensors: ``model/<state-dict key>``, ``mask/<parameter name>``,
``optim/<path>`` (the optimizer's tensors; the rest of its state dict is JSON in the metadata),
``rng/<name>``. The JSON metadata holds the format tag, how to rebuild the model
(``{"name", "num_classes", "in_channels", "image_size"}``) and whatever the caller adds (epoch,
step, metrics). Nothing is pickled; files are written atomically.

Sparse content is stored compactly (:func:`prunescope.files.save_tensors`): the mask as bits (or
indices), and each masked weight whose pruned entries are zero as its kept values only, so a
sparse checkpoint is smaller than the dense one; :func:`load` returns the dense tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunescope.errors import CheckpointError, PrunescopeError
from prunescope.files import load_tensors, save_tensors
from prunescope.mask import Mask

CHECKPOINT_FORMAT = "prunescope.checkpoint/1"


@dataclass
class Checkpoint:
    """The parts of a checkpoint file; any may be empty."""

    model: dict[str, torch.Tensor]
    meta: dict[str, Any]
    mask: Mask | None = None
    optimizer: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)


def model_spec(model: nn.Module, num_classes: int) -> dict[str, Any] | None:
    """How to rebuild a registry model (or a model that carries its own ``model_spec``, e.g. a
    Hugging Face one, :mod:`prunescope.hub.models`), or None for a user-defined one."""
    own = getattr(model, "model_spec", None)
    if isinstance(own, dict):
        return dict(own)
    name, shape = getattr(model, "model_name", None), getattr(model, "input_shape", None)
    if name is None or shape is None:
        return None
    return {"name": name, "num_classes": num_classes, "in_channels": shape[0],
            "image_size": shape[-1]}


def describe(spec: dict[str, Any] | None) -> str:
    """A model spec in words (for inspections and error messages)."""
    if not spec:
        return "-"
    if spec.get("source") == "huggingface":
        return (f"{spec.get('path')} (Hugging Face {spec.get('task')}, "
                f"{spec.get('num_labels')} labels)")
    return (f"{spec.get('name')} ({spec.get('num_classes')} classes, input "
            f"{spec.get('in_channels')}x{spec.get('image_size')}x{spec.get('image_size')})")


def save(path: str | os.PathLike, model: nn.Module, *, meta: dict[str, Any],
         mask: Mask | None = None, optimizer: torch.optim.Optimizer | None = None,
         rng: dict[str, torch.Tensor] | None = None) -> None:
    """Write a checkpoint atomically."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    kept_by = {}
    if mask is not None:
        tensors.update({f"mask/{k}": v for k, v in mask.items()})
        kept_by = {f"model/{k}": f"mask/{k}" for k in mask if f"model/{k}" in tensors}
    full_meta = {**meta, "format": CHECKPOINT_FORMAT}
    if optimizer is not None:
        optim_tensors: dict[str, torch.Tensor] = {}
        full_meta["optimizer"] = _split(optimizer.state_dict(), "optim", optim_tensors)
        tensors.update(optim_tensors)
    tensors.update({f"rng/{k}": v for k, v in (rng or {}).items()})
    save_tensors(path, tensors, full_meta, kept_by=kept_by)


def load(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint; a missing, corrupt, pickled or foreign file raises CheckpointError."""
    tensors, meta = load_tensors(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a prunescope checkpoint (format {meta.get('format')!r}); "
            "pass a model.safetensors or last.safetensors from a prunescope run"
        )
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "mask": {}, "optim": {}, "rng": {}}
    for key, tensor in tensors.items():
        group, _, rest = key.partition("/")
        if group not in groups:
            raise CheckpointError(f"{path} has an unexpected tensor {key!r}")
        groups[group][rest] = tensor
    optimizer = meta.pop("optimizer", None)
    return Checkpoint(
        model=groups["model"],
        meta=meta,
        mask=_mask(groups["mask"], path),
        optimizer=_join(optimizer, groups["optim"], "optim") if optimizer is not None else None,
        rng=groups["rng"],
    )


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: os.PathLike | str
                     ) -> None:
    """``model.load_state_dict(state)`` with a one-line CheckpointError when it does not fit."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(f"{path} does not fit the model: {detail}") from None


def build_model(checkpoint: Checkpoint, path: str | os.PathLike) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights and mask."""
    spec = checkpoint.meta.get("model")
    if not spec:
        raise CheckpointError(
            f"{path} holds a user-defined model; build it yourself and load the 'model/' tensors"
        )
    try:
        model = from_spec(spec)
    except (PrunescopeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} describes a model prunescope cannot build: {exc}") from None
    load_model_state(model, checkpoint.model, path)
    if checkpoint.mask is not None:
        try:
            checkpoint.mask.check(model)
        except PrunescopeError as exc:
            raise CheckpointError(
                f"{path} holds a mask that does not fit its model: {exc}"
            ) from None
    return model


def from_spec(spec: dict[str, Any]) -> nn.Module:
    """A fresh model of a checkpoint's model spec: a registry model, or a Hugging Face one
    (``"source": "huggingface"``)."""
    if spec.get("source") == "huggingface":
        from prunescope.hub.models import build

        return build(spec)
    from prunescope import models

    return models.build(spec["name"], num_classes=spec["num_classes"],
                        in_channels=spec["in_channels"], image_size=spec["image_size"])


def _mask(tensors: dict[str, torch.Tensor], path) -> Mask | None:
    if not tensors:
        return None
    try:
        return Mask(tensors)
    except PrunescopeError as exc:
        raise CheckpointError(f"{path} holds an invalid mask: {exc}") from None


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of ``obj`` with its tensors moved into ``tensors`` under path keys."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if any(not isinstance(k, str | int) for k in obj):
            raise TypeError(f"cannot store dict keys of {prefix}")
        return {"__dict__": [[k, _split(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_split(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix}")


def _join(skeleton: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Inverse of :func:`_split` (keys of ``tensors`` are relative to ``prefix``)."""
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"][len(prefix) + 1:]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {k: _join(v, tensors, prefix) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [_join(v, tensors, prefix) for v in skeleton]
    return skeleton
