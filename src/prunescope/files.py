"""Atomic file writes and the safe tensor file format.

Every file prunescope writes goes through :func:`atomic_write_bytes` (or :func:`append_jsonl`; the
torch-free report calls :func:`prunescope.atomic.replace_file` beneath them directly):
written to a temporary file in the target directory, flushed, then renamed over the target, so a
killed process leaves either the old file or the new one, never half of one. In multi-process
training only rank 0 writes. Tensors are stored with safetensors (no pickle);
JSON metadata rides in the safetensors header. Pickle files are refused, never unpickled.

Sparse content is stored compactly and decoded transparently by :func:`load_tensors`: a bool
tensor (a mask) as bits (``numpy.packbits``) or, when that is smaller, as the flat indices of its
True entries; a tensor named in ``save_tensors(..., kept_by=...)`` as only its kept values when
its other entries are all zero. How each tensor is stored is JSON under the header key
``prunescope.encoding`` (``{name: {"as": "bits" | "indices" | "kept", "shape": [...],
"mask": name}}``); a tensor it does not name is stored as is, so files from before the encoding
(bool tensors stored as bytes) load unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from prunescope import distributed
from prunescope.atomic import replace_file
from prunescope.errors import CheckpointError

META_KEY = "prunescope"
ENCODING_KEY = "prunescope.encoding"
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # raw pickle protocol 2+, torch.save zip archive


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, then rename).

    In multi-process training only rank 0 writes; the call is a no-op on the other ranks.
    """
    if distributed.is_writer():
        replace_file(path, data)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh staging directory beside ``path``; when the block ends without an error it
    replaces ``path`` (a directory there before is removed only after the new one is complete),
    otherwise it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    staging.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as a line (a torn last line is skipped by :func:`read_jsonl`).

    A no-op on ranks other than 0 in multi-process training.
    """
    if not distributed.is_writer():
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON-lines file; a torn trailing line from a killed writer is ignored."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict, *,
                 kept_by: dict[str, str] | None = None) -> None:
    """Save ``tensors`` and JSON-able ``meta`` to a safetensors file, atomically.

    Bool tensors are stored as bits or indices; ``kept_by`` maps a tensor's name to the name of
    a bool tensor of its shape in ``tensors`` (its mask): when every entry the mask drops is zero,
    only the kept values are stored. :func:`load_tensors` returns the tensors as given (a pruned
    ``-0.0`` comes back as ``0.0``).
    """
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    stored, encoding = encode_tensors(contiguous, kept_by or {})
    header = {META_KEY: json.dumps(meta)}
    if encoding:
        header[ENCODING_KEY] = json.dumps(encoding)
    atomic_write_bytes(path, safetensors_bytes(stored, metadata=header))


def encode_tensors(tensors: dict[str, torch.Tensor], kept_by: dict[str, str]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The tensors to store and the encoding of those stored compactly (see the module doc)."""
    stored, encoding = dict(tensors), {}
    for name, tensor in tensors.items():
        if tensor.dtype == torch.bool:
            stored[name], encoding[name] = pack_bool(tensor)
    for name, mask_name in kept_by.items():
        tensor, keep = tensors[name], tensors.get(mask_name)
        if (keep is not None and keep.dtype == torch.bool and keep.shape == tensor.shape
                and tensor.dtype != torch.bool and not tensor[~keep].any()):
            stored[name] = tensor[keep]
            encoding[name] = {"as": "kept", "shape": list(tensor.shape), "mask": mask_name}
    return stored, encoding


def pack_bool(tensor: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """A bool tensor as bits (uint8, 8 entries a byte) or, when smaller, as the int32/int64 flat
    indices of its True entries; returns ``(stored tensor, encoding)`` for :func:`unpack_bool`."""
    flat = tensor.reshape(-1)
    shape = list(tensor.shape)
    kept = int(flat.count_nonzero())
    index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    if kept * index_dtype.itemsize < (flat.numel() + 7) // 8:
        return flat.nonzero().reshape(-1).to(index_dtype), {"as": "indices", "shape": shape}
    return torch.from_numpy(np.packbits(flat.numpy())), {"as": "bits", "shape": shape}


def unpack_bool(stored: torch.Tensor, encoding: dict) -> torch.Tensor:
    """Inverse of :func:`pack_bool`; ValueError when ``stored`` does not fit ``encoding``."""
    shape = tuple(encoding["shape"])
    numel = int(np.prod(shape, dtype=np.int64))
    if encoding["as"] == "bits":
        if stored.dtype != torch.uint8 or stored.numel() != (numel + 7) // 8:
            raise ValueError("bit-packed mask of the wrong size")
        bits = np.unpackbits(stored.numpy(), count=numel).astype(bool)
        return torch.from_numpy(bits).reshape(shape)
    if stored.dtype not in (torch.int32, torch.int64) or stored.dim() != 1:
        raise ValueError("mask indices must be a 1-d int32 or int64 tensor")
    if stored.numel() and not (int(stored.min()) >= 0 and int(stored.max()) < numel):
        raise ValueError("mask index out of range")
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[stored.long()] = True
    return flat.reshape(shape)


def decode_tensors(stored: dict[str, torch.Tensor], encoding: dict[str, dict]
                   ) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_tensors`; ValueError (or KeyError) on an inconsistent file."""
    tensors = dict(stored)
    for name, spec in encoding.items():
        if spec["as"] in ("bits", "indices"):
            tensors[name] = unpack_bool(stored[name], spec)
    for name, spec in encoding.items():
        if spec["as"] == "kept":
            keep, values = tensors[spec["mask"]], stored[name]
            if keep.dtype != torch.bool or list(keep.shape) != spec["shape"]:
                raise ValueError(f"{name} names a mask of another shape")
            if values.dim() != 1 or values.numel() != int(keep.count_nonzero()):
                raise ValueError(f"{name} holds another number of values than its mask keeps")
            dense = torch.zeros(keep.shape, dtype=values.dtype)
            dense[keep] = values
            tensors[name] = dense
        elif spec["as"] not in ("bits", "indices"):
            raise ValueError(f"unknown encoding {spec['as']!r} of {name}")
    return tensors


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a file written by :func:`save_tensors`: ``(tensors, meta)``, decoded.

    Raises :class:`CheckpointError` for a missing file, a pickle file (never unpickled), a
    corrupt file, or a safetensors file that prunescope did not write.
    """
    tensors, meta, header = read_stored(path)
    try:
        return decode_tensors(tensors, json.loads(header.get(ENCODING_KEY, "{}"))), meta
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path} has a corrupt tensor encoding ({exc})") from None


def read_stored(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """The tensors as stored (not decoded), the prunescope metadata and the raw header
    metadata of a file written by :func:`save_tensors`; errors as :func:`load_tensors`."""
    return _read(path, tensors=True)


def read_meta(path: str | os.PathLike) -> dict:
    """The prunescope metadata of a file written by :func:`save_tensors`, without reading its
    tensors; errors as :func:`load_tensors`."""
    return _read(path, tensors=False)[1]


def _read(path: str | os.PathLike, *, tensors: bool
          ) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}; check the path")
    with open(path, "rb") as handle:
        head = handle.read(9)
    # safetensors: an 8-byte header length (its first byte may be 0x80), then the JSON "{"
    if head.startswith(_PICKLE_MAGIC) and head[8:9] != b"{":
        raise CheckpointError(
            f"{path} is a pickle/torch.save file, which prunescope never unpickles; "
            "save it with safetensors or a prunescope command"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            stored = ({key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
                      if tensors else {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({exc})") from None
    if META_KEY not in header:
        raise CheckpointError(f"{path} was not written by prunescope (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has corrupt prunescope metadata") from None
    return stored, meta, header
