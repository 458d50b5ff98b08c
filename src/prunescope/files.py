"""Atomic file writes and the safe tensor file format.

Every file prunescope writes goes through :func:`atomic_write_bytes` (or :func:`append_jsonl`; the
torch-free report calls :func:`prunescope.atomic.replace_file` beneath them directly):
written to a temporary file in the target directory, flushed, then renamed over the target, so a
killed process leaves either the old file or the new one, never half of one. In multi-process
training only rank 0 writes. Tensors are stored with safetensors (no pickle);
JSON metadata rides in the safetensors header. Pickle files are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from prunescope import distributed
from prunescope.atomic import replace_file
from prunescope.errors import CheckpointError

META_KEY = "prunescope"
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # raw pickle protocol 2+, torch.save zip archive


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, then rename).

    In multi-process training only rank 0 writes; the call is a no-op on the other ranks.
    """
    if distributed.is_writer():
        replace_file(path, data)


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


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Save ``tensors`` and JSON-able ``meta`` to a safetensors file, atomically."""
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    data = safetensors_bytes(contiguous, metadata={META_KEY: json.dumps(meta)})
    atomic_write_bytes(path, data)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a file written by :func:`save_tensors`: ``(tensors, meta)``.

    Raises :class:`CheckpointError` for a missing file, a pickle file (never unpickled), a
    corrupt file, or a safetensors file that prunescope did not write.
    """
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
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({exc})") from None
    if META_KEY not in header:
        raise CheckpointError(f"{path} was not written by prunescope (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has corrupt prunescope metadata") from None
    return tensors, meta
