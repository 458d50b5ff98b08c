"""The sparse inference file (``prunescope.sparse/1``): a pruned model, compact, for the kernels.

One safetensors file (nothing pickled) holds everything needed to rebuild and run a pruned model
without its checkpoint or training code path:

* ``sparse/<module>/values`` (float): the kept weights of a sparse layer in row-major order of
  its dense weight ``[out, in]`` or ``[out, in / groups, kh, kw]`` (``values == weight[mask]``);
  ``sparse/<module>/ptr`` (int32, int64 beyond 2**31 kept weights): row ``k`` owns
  ``values[ptr[k]:ptr[k + 1]]``; ``sparse/<module>/idx`` (int16 where the row length allows,
  else int32): each kept weight's column in its row's flattened ``[in / groups, kh, kw]``,
  strictly increasing within a row. No mask and no dense weight is stored for these layers.
* ``dense/<name>``: every other parameter and buffer of the model (biases, embeddings, layer
  norms, layers left dense), non-persistent buffers included, so the model can be built on the
  ``meta`` device and filled from the file alone.

The JSON metadata (header key ``prunescope``) names the format, the architecture (``model``: a
registry spec, or a Hugging Face spec with the model's ``config`` dict), ``layers`` (per sparse
layer: kind, dense shape, bias, and the Conv2d geometry), ``dense`` (the dense tensors' names),
``architecture`` (a hash of every parameter and buffer name, shape and dtype of the dense model:
the identity of the model the file is for) and ``fingerprint``, a SHA-256 over the metadata and
every tensor's name, dtype, shape and bytes. :func:`read` recomputes the fingerprint and checks
every index structure, so a corrupt or edited file, a file for another model and a layer kind the
kernels do not run are refused with one :class:`~prunescope.errors.CheckpointError` line.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunescope import files
from prunescope.errors import CheckpointError

SPARSE_FORMAT = "prunescope.sparse/1"
KINDS = ("linear", "conv2d")
FLOAT_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class SparseTensor:
    """One sparse layer's weight: CSR over output rows of its dense ``shape``."""

    values: torch.Tensor
    ptr: torch.Tensor
    idx: torch.Tensor
    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def columns(self) -> int:
        return int(torch.Size(self.shape[1:]).numel())

    def dense(self) -> torch.Tensor:
        """The dense weight (zeros at pruned places)."""
        counts = (self.ptr[1:] - self.ptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(self.rows), counts)
        weight = torch.zeros(self.rows, self.columns, dtype=self.values.dtype)
        weight[rows, self.idx.long()] = self.values
        return weight.reshape(self.shape)


def encode(weight: torch.Tensor, keep: torch.Tensor) -> SparseTensor:
    """The CSR form of ``weight`` keeping the entries where ``keep`` (bool, same shape) is True,
    with the smallest index types that hold it."""
    rows = weight.shape[0]
    keep2 = keep.reshape(rows, -1)
    columns = keep2.shape[1]
    values = weight.detach().reshape(rows, -1)[keep2].contiguous()
    counts = keep2.sum(1)
    ptr = torch.zeros(rows + 1, dtype=torch.int64)
    ptr[1:] = counts.cumsum(0)
    idx = keep2.nonzero()[:, 1]
    return SparseTensor(values, ptr.to(_index_dtype(values.numel(), torch.int32)),
                        idx.to(_index_dtype(columns - 1, torch.int16)), tuple(weight.shape))


def _index_dtype(largest: int, smallest: torch.dtype) -> torch.dtype:
    for dtype in (torch.int16, torch.int32, torch.int64):
        if dtype.itemsize >= smallest.itemsize and largest <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"index {largest} does not fit int64")


def architecture(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer name, shape and dtype of ``model`` (the identity of
    the architecture a file is for; the weights' values do not enter it)."""
    entries = [[name, list(t.shape), str(t.dtype)] for name, t in _tensors(model).items()]
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones included) by its qualified name."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def layer_entry(module: nn.Module) -> dict[str, Any] | None:
    """The metadata of a module the kernels run sparse, or None when they do not run it
    (not a Linear/Conv2d, a transposed conv, a non-zero padding mode, a dtype other than
    float32/float64)."""
    from prunescope.kernels.modules import conv_pads

    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        return None
    bias = getattr(module, "bias", None) is not None
    if type(module) is nn.Linear:
        return {"kind": "linear", "shape": list(weight.shape), "bias": bias}
    if type(module) is nn.Conv2d and module.padding_mode == "zeros":
        return {"kind": "conv2d", "shape": list(weight.shape), "bias": bias,
                "stride": list(module.stride), "pads": list(conv_pads(module)),
                "dilation": list(module.dilation), "groups": module.groups}
    return None


def write(out: str | os.PathLike, model: nn.Module, keep: dict[str, torch.Tensor],
          meta: dict[str, Any], *, replace: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``model`` to ``out``: the modules named in ``keep`` (``{module name: bool mask of
    its weight}``, each one :func:`layer_entry` accepts) as sparse layers, every other tensor
    dense, ``replace`` (``{tensor name: tensor}``, e.g. weights with their pruned entries
    zeroed) taking the place of the model's own. ``meta`` (JSON-able: ``model``, ``data``,
    ``source``, ...) is stored beside the format's own keys. Written atomically."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    modules = dict(model.named_modules())
    for name, mask in keep.items():
        entry = layer_entry(modules[name])
        if entry is None:
            raise CheckpointError(f"layer {name!r} has no sparse kernel; keep it dense")
        sparse = encode(modules[name].weight, mask)
        layers[name] = {**entry, "kept": sparse.values.numel()}
        tensors.update({f"sparse/{name}/values": sparse.values, f"sparse/{name}/ptr": sparse.ptr,
                        f"sparse/{name}/idx": sparse.idx})
    sparse_weights = {f"{name}.weight" for name in layers}
    own = {**_tensors(model), **(replace or {})}
    dense = {n: t.detach() for n, t in own.items() if n not in sparse_weights}
    tensors.update({f"dense/{n}": t for n, t in dense.items()})
    full = {**meta, "format": SPARSE_FORMAT, "layers": layers, "dense": list(dense),
            "architecture": architecture(model)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    full["fingerprint"] = fingerprint(tensors, full)
    files.save_tensors(out, tensors, full)


def fingerprint(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """SHA-256 over the metadata (without its ``fingerprint``) and every tensor's name, dtype,
    shape and bytes, in name order."""
    digest = hashlib.sha256()
    rest = {k: v for k, v in meta.items() if k != "fingerprint"}
    digest.update(json.dumps(rest, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class SparseFile:
    """What :func:`read` returns: the metadata, the sparse layers and the dense tensors."""

    meta: dict[str, Any]
    sparse: dict[str, SparseTensor]
    dense: dict[str, torch.Tensor]


def is_sparse_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a prunescope file of this format (reads the header only; False for
    anything unreadable)."""
    try:
        return files.read_meta(path).get("format") == SPARSE_FORMAT
    except CheckpointError:
        return False


def read(path: str | os.PathLike) -> SparseFile:
    """Read and verify a sparse inference file.

    Raises :class:`CheckpointError` (one line) for a missing, pickled or corrupt file, a file of
    another format, a fingerprint that does not match the content, an index structure that does
    not fit its layer's shape, and a layer kind the kernels do not run.
    """
    tensors, meta, _ = files.read_stored(path)
    if meta.get("format") != SPARSE_FORMAT:
        raise CheckpointError(f"{path} is not a sparse inference file (format "
                              f"{meta.get('format')!r}); write one with 'prunescope export "
                              "CHECKPOINT --format sparse'")
    if meta.get("fingerprint") != fingerprint(tensors, meta):
        raise CheckpointError(f"{path} is corrupt: its content does not match its fingerprint "
                              "(export it again)")
    try:
        sparse = {name: _sparse(tensors, name, entry) for name, entry in meta["layers"].items()}
        dense = {name: tensors[f"dense/{name}"] for name in meta["dense"]}
    except KeyError as exc:
        raise CheckpointError(f"{path} is corrupt: tensor {exc} is missing") from None
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from None
    return SparseFile(meta, sparse, dense)


def _sparse(tensors: dict[str, torch.Tensor], name: str, entry: dict[str, Any]) -> SparseTensor:
    kind = entry.get("kind")
    if kind not in KINDS:
        raise ValueError(f"layer {name!r} is of kind {kind!r}, which the sparse kernels do not "
                         f"run (they run {', '.join(KINDS)})")
    shape = tuple(entry["shape"])
    if len(shape) != (2 if kind == "linear" else 4) or min(shape) < 1:
        raise ValueError(f"layer {name!r} has a {kind} weight shape {list(shape)}")
    sparse = SparseTensor(tensors[f"sparse/{name}/values"], tensors[f"sparse/{name}/ptr"],
                          tensors[f"sparse/{name}/idx"], shape)
    check(sparse, name)
    return sparse


def check(sparse: SparseTensor, name: str) -> None:
    """ValueError unless ``sparse`` is a well-formed CSR of its shape: float values, a
    non-decreasing row pointer from 0 to the number of values, and columns in range and strictly
    increasing within each row."""
    values, ptr, idx = sparse.values, sparse.ptr, sparse.idx
    if values.dtype not in FLOAT_DTYPES or values.dim() != 1:
        raise ValueError(f"layer {name!r} holds {values.dtype} values of shape "
                         f"{list(values.shape)}; expected 1-d float32 or float64")
    if ptr.dtype not in (torch.int32, torch.int64) or ptr.shape != (sparse.rows + 1,):
        raise ValueError(f"layer {name!r} has a row pointer of shape {list(ptr.shape)}, "
                         f"expected [{sparse.rows + 1}]")
    if idx.dtype not in (torch.int16, torch.int32) or idx.shape != values.shape:
        raise ValueError(f"layer {name!r} has {idx.numel()} column indices for "
                         f"{values.numel()} values")
    counts = ptr[1:].long() - ptr[:-1].long()
    if int(ptr[0]) != 0 or int(ptr[-1]) != values.numel() or bool((counts < 0).any()):
        raise ValueError(f"layer {name!r} has a row pointer that does not cover its values")
    if values.numel() == 0:
        return
    columns = idx.long()
    if int(columns.min()) < 0 or int(columns.max()) >= sparse.columns:
        raise ValueError(f"layer {name!r} has a column index outside 0..{sparse.columns - 1}")
    starts = ptr[1:-1].long()
    starts = starts[(starts > 0) & (starts < values.numel())]  # rows starting after a value
    same_row = torch.ones(values.numel() - 1, dtype=torch.bool)
    same_row[starts - 1] = False  # the pair (start - 1, start) crosses a row boundary
    if bool((columns.diff()[same_row] <= 0).any()):
        raise ValueError(f"layer {name!r} has column indices that do not increase within a row")

