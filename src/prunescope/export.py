"""Looking into and exporting sparse models: ``prunescope inspect`` and ``prunescope export``.

:func:`inspect` describes a checkpoint or mask file (per-layer and global sparsity, model,
dataset, epoch/step, file size) from the file alone: no dataset is loaded.

:func:`export_compact` writes a checkpoint's weights for deployment as a safetensors file
(format ``prunescope.compact/1``) of the nonzero values and their indices: every weight of two or
more dimensions whose CSR form is smaller is stored as ``csr/<name>/{values,col_indices,
crow_indices}`` over its 2-d view ``(shape[0], rest)`` (column indices in the smallest integer
type that holds them), every other tensor as ``dense/<name>``. :func:`load_compact` rebuilds the
dense state dict exactly (a pruned ``-0.0`` comes back as ``0.0``).

:func:`export_onnx` writes the dense-with-zeros model as ONNX through ``torch.onnx.export``
(its exporter needs the ``onnx`` and ``onnxscript`` packages: ``pip install 'prunescope[onnx]'``).

:func:`export_sparse` writes the model for sparse inference on prunescope's kernels
(format ``prunescope.sparse/1``, :mod:`prunescope.kernels.sparse_file`): kept values and indices of
its masked Linear/Conv2d layers, every other tensor dense, the architecture and a fingerprint in
the header; :func:`prunescope.kernels.runtime.load` runs it, ``prunescope evaluate --checkpoint
FILE`` evaluates it (docs/inference.md).

The exports take the weights with the checkpoint's mask applied.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from prunescope import checkpoint, files
from prunescope.errors import CheckpointError, ConfigError
from prunescope.kernels.sparse_file import SPARSE_FORMAT
from prunescope.mask import MASK_FORMAT, Mask

COMPACT_FORMAT = "prunescope.compact/1"
ONNX_PACKAGES = ("onnx", "onnxscript")
FORMATS = ("compact", "sparse", "onnx", "huggingface")


# -- inspect ---------------------------------------------------------------------------------

def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint or mask file holds, without loading any dataset.

    Returns ``{"path", "bytes", "kind" ("checkpoint" | "mask"), "format", "model", "data",
    "epoch", "step", "has_mask", "layers": [{"name", "shape", "kept", "total", "sparsity"}],
    "kept", "total", "sparsity"}``. The sparsity is the mask's; a checkpoint without a mask
    counts the zeros of its prunable weights (the Linear and Conv weights of its model).
    """
    path = Path(path)
    kind = files.read_meta(path).get("format")
    if kind == SPARSE_FORMAT:
        return _inspect_sparse(path)
    if kind == MASK_FORMAT:
        mask, meta, state = Mask.load(path), {}, None
    elif kind == checkpoint.CHECKPOINT_FORMAT:
        loaded = checkpoint.load(path)
        mask, meta, state = loaded.mask, loaded.meta, loaded.model
    else:
        raise CheckpointError(
            f"{path} is neither a prunescope checkpoint nor a mask file (format {kind!r})")
    keep = dict(mask.items()) if mask is not None else _nonzeros(state, meta.get("model"))
    layers = [{"name": name, "shape": list(k.shape), "kept": int(k.count_nonzero()),
               "total": k.numel()} for name, k in keep.items()]
    for layer in layers:
        layer["sparsity"] = _sparsity(layer["kept"], layer["total"])
    kept, total = sum(x["kept"] for x in layers), sum(x["total"] for x in layers)
    return {"path": str(path), "bytes": path.stat().st_size,
            "kind": "mask" if kind == MASK_FORMAT else "checkpoint", "format": kind,
            "model": meta.get("model"), "data": meta.get("data"), "epoch": meta.get("epoch"),
            "step": meta.get("step"), "has_mask": mask is not None, "layers": layers,
            "kept": kept, "total": total, "sparsity": _sparsity(kept, total)}


def _inspect_sparse(path: Path) -> dict[str, Any]:
    """:func:`inspect` of a sparse inference file (its header only: the file is not verified
    here; loading it is)."""
    meta = files.read_meta(path)
    layers = [{"name": name, "shape": entry["shape"], "kept": entry["kept"],
               "total": math.prod(entry["shape"])} for name, entry in meta["layers"].items()]
    for layer in layers:
        layer["sparsity"] = _sparsity(layer["kept"], layer["total"])
    kept, total = sum(x["kept"] for x in layers), sum(x["total"] for x in layers)
    spec = {k: v for k, v in (meta.get("model") or {}).items() if k not in ("config", "class")}
    return {"path": str(path), "bytes": path.stat().st_size, "kind": "sparse",
            "format": SPARSE_FORMAT, "model": spec, "data": meta.get("data"), "epoch": None,
            "step": None, "has_mask": True, "layers": layers, "kept": kept, "total": total,
            "sparsity": _sparsity(kept, total)}


def format_inspection(info: dict[str, Any]) -> str:
    """:func:`inspect`'s result as a table for people."""
    model, source = info["model"], info["data"]
    model_text = checkpoint.describe(model)
    data_text = (", ".join(f"{k} {v}" for k, v in source.items() if k != "name" and v is not None)
                 if source else "")
    data_text = f"{source['name']} ({data_text})" if source else "-"
    sparsity_from = ("its sparse layers" if info["kind"] == "sparse" else
                     "its mask" if info["has_mask"] else "the zeros of its weights")
    lines = [f"file        {info['path']} ({info['bytes']:,} bytes)",
             f"kind        {info['kind']} ({info['format']}); sparsity from {sparsity_from}"]
    if info["kind"] == "sparse":
        lines += [f"model       {model_text}", f"data        {data_text}"]
    if info["kind"] == "checkpoint":
        lines += [f"model       {model_text}", f"data        {data_text}",
                  f"epoch/step  {_or_dash(info['epoch'])} / {_or_dash(info['step'])}"]
    width = max([len("layer"), *(len(x["name"]) for x in info["layers"])])
    lines += ["", f"{'layer':<{width}}  {'shape':<16} {'kept/total':>21}  sparsity"]
    for x in [*info["layers"], {"name": "global", "shape": None, **_totals(info)}]:
        shape = "x".join(map(str, x["shape"])) if x["shape"] is not None else ""
        counts = f"{x['kept']:,}/{x['total']:,}"
        lines.append(f"{x['name']:<{width}}  {shape:<16} {counts:>21}  {x['sparsity']:.4f}")
    return "\n".join(lines)


def _totals(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in ("kept", "total", "sparsity")}


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _sparsity(kept: int, total: int) -> float:
    return 1.0 - kept / total if total else 0.0


def _nonzeros(state: dict[str, torch.Tensor], spec: dict | None) -> dict[str, torch.Tensor]:
    """``{name: weight != 0}`` for the prunable weights: the Linear and Conv weights of the
    registry model, else every floating ``*weight`` tensor of two or more dimensions."""
    names = _prunable_names(spec)
    if names is None or not set(names) <= set(state):
        names = [k for k, t in state.items()
                 if k.endswith("weight") and t.dim() >= 2 and t.is_floating_point()]
    return {name: state[name] != 0 for name in names}


def _prunable_names(spec: dict | None) -> list[str] | None:
    if not spec:
        return None
    from prunescope import checkpoint
    from prunescope.errors import PrunescopeError
    from prunescope.targets import default_targets

    try:
        return default_targets(checkpoint.from_spec(spec))
    except (PrunescopeError, KeyError, TypeError):
        return None


# -- compact ---------------------------------------------------------------------------------

def export_compact(path: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write checkpoint ``path`` as a compact file ``out``; returns the sizes in bytes:
    ``{"format", "out", "bytes", "checkpoint_bytes", "dense_bytes"}`` (``dense_bytes``: the
    weights stored densely)."""
    loaded = checkpoint.load(path)
    state = _masked_state(loaded, path)
    tensors, shapes = {}, {}
    for name, tensor in state.items():
        csr = _to_csr(tensor)
        if csr is None:
            tensors[f"dense/{name}"] = tensor
        else:
            tensors.update({f"csr/{name}/{part}": t for part, t in csr.items()})
            shapes[name] = list(tensor.shape)
    meta = {"format": COMPACT_FORMAT, "model": loaded.meta.get("model"),
            "data": loaded.meta.get("data"), "source": str(path), "csr_shapes": shapes,
            "order": list(state)}
    files.save_tensors(out, tensors, meta)
    return _sizes("compact", path, out, state)


def load_compact(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense state dict a file of :func:`export_compact` holds.

    Raises :class:`CheckpointError` for a file of another format or inconsistent content.
    """
    tensors, meta = files.load_tensors(path)
    if meta.get("format") != COMPACT_FORMAT:
        raise CheckpointError(f"{path} is not a compact export (format {meta.get('format')!r}); "
                              "pass a file written by 'prunescope export --format compact'")
    try:
        state = {}
        for name in meta["order"]:
            if name in meta["csr_shapes"]:
                parts = {p: tensors[f"csr/{name}/{p}"] for p in ("values", "col_indices",
                                                                  "crow_indices")}
                state[name] = _from_csr(parts, tuple(meta["csr_shapes"][name]))
            else:
                state[name] = tensors[f"dense/{name}"]
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is a corrupt compact export ({exc})") from None
    return state


def _to_csr(tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The CSR parts of ``tensor``'s 2-d view ``(shape[0], rest)``, or None where that is not
    smaller than the dense tensor (or the tensor is not a floating weight of two or more dims)."""
    if tensor.dim() < 2 or not tensor.is_floating_point():
        return None
    matrix = tensor.reshape(tensor.shape[0], -1)
    rows, cols = matrix.nonzero(as_tuple=True)
    col_dtype = _index_dtype(matrix.shape[1])
    crow_dtype = _index_dtype(rows.numel() + 1)
    size = (rows.numel() * (tensor.element_size() + col_dtype.itemsize)
            + (matrix.shape[0] + 1) * crow_dtype.itemsize)
    if size >= tensor.numel() * tensor.element_size():
        return None
    counts = torch.bincount(rows, minlength=matrix.shape[0])
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return {"values": matrix[rows, cols], "col_indices": cols.to(col_dtype),
            "crow_indices": crow.to(crow_dtype)}


def _from_csr(parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    values, cols, crow = parts["values"], parts["col_indices"].long(), parts["crow_indices"].long()
    n_rows = shape[0]
    n_cols = math.prod(shape[1:])
    counts = crow.diff()
    if (crow.numel() != n_rows + 1 or int(crow[0]) != 0 or bool((counts < 0).any())
            or int(crow[-1]) != values.numel() or cols.numel() != values.numel()
            or (cols.numel() and not (int(cols.min()) >= 0 and int(cols.max()) < n_cols))):
        raise ValueError("CSR parts do not fit the shape")
    dense = torch.zeros(n_rows, n_cols, dtype=values.dtype)
    dense[torch.repeat_interleave(torch.arange(n_rows), counts), cols] = values
    return dense.reshape(shape)


def _index_dtype(limit: int) -> torch.dtype:
    """The smallest signed integer type holding every index below ``limit``."""
    for dtype in (torch.int16, torch.int32):
        if limit <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


# -- sparse inference ------------------------------------------------------------------------

def export_sparse(path: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write checkpoint ``path`` as a sparse inference file ``out``
    (:func:`prunescope.kernels.runtime.export`: its masked Linear/Conv2d layers as kept values
    and indices, the rest dense; a masked layer without a sparse kernel is stored dense with one
    warning line); returns the sizes as :func:`export_compact` does, with ``sparse_layers`` and
    ``dense_layers``. The mask is the checkpoint's, else the zeros of its weights."""
    from prunescope.kernels import runtime

    loaded = checkpoint.load(path)
    model = checkpoint.build_model(loaded, path)
    mask = loaded.mask if loaded.mask is not None else Mask.from_weights(model)
    result = runtime.export(model, dict(mask.items()), out, spec=loaded.meta["model"],
                            meta={"data": loaded.meta.get("data"), "source": str(path)})
    dense = {n: t.masked_fill(~mask[n], 0) if n in mask else t
             for n, t in model.state_dict().items()}
    return {**_sizes("sparse", path, out, dense), "sparse_layers": result["sparse_layers"],
            "dense_layers": result["dense_layers"]}


# -- ONNX ------------------------------------------------------------------------------------

def export_onnx(path: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write the registry model of checkpoint ``path`` (mask applied) as ONNX to ``out``, with
    a dynamic batch dimension; returns the sizes as :func:`export_compact` does.

    Raises :class:`ConfigError` when ``onnx`` or ``onnxscript`` is not installed, and
    :class:`CheckpointError` for a user-defined model (export it with ``torch.onnx.export``).
    """
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--format onnx needs the package(s) {' and '.join(missing)}: "
                          "pip install 'prunescope[onnx]'")
    loaded = checkpoint.load(path)
    model = checkpoint.build_model(loaded, path)
    if loaded.mask is not None:
        loaded.mask.apply_(model)
    model.eval()
    example = torch.zeros(2, *model.input_shape)
    with _quiet_exporter():
        program = torch.onnx.export(model, (example,), dynamo=True, verbose=False,
                                    input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    files.atomic_write_bytes(out, program.model_proto.SerializeToString())
    return _sizes("onnx", path, out, model.state_dict())


@contextlib.contextmanager
def _quiet_exporter():
    """Hide the exporter's notices (missing torchvision ops, deprecations): they concern
    models prunescope does not build."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        exporter_log.setLevel(level)


# -- Hugging Face ----------------------------------------------------------------------------

def export_huggingface(path: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write the Hugging Face model of checkpoint ``path`` (mask applied) as a transformers
    folder ``out`` (:func:`prunescope.hub.models.save_pretrained`: config with the class names,
    safetensors weights, tokenizer, and the mask beside); returns the sizes, ``bytes`` being
    the folder's. A checkpoint of another model is a CheckpointError."""
    loaded = checkpoint.load(path)
    spec = loaded.meta.get("model") or {}
    if spec.get("source") != "huggingface":
        raise CheckpointError(f"{path} holds {checkpoint.describe(spec)}, not a Hugging Face "
                              "model; export it with --format compact or onnx")
    from prunescope.hub.models import save_pretrained

    model = checkpoint.build_model(loaded, path)
    if loaded.mask is not None:
        loaded.mask.apply_(model)
    source = loaded.meta.get("data") or {}
    classes = _classes(source)
    save_pretrained(model, out, classes=classes, mask=loaded.mask)
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    return {"format": "huggingface", "out": str(out), "bytes": size,
            "checkpoint_bytes": Path(path).stat().st_size,
            "dense_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
            "labels": list(classes) if classes else None}


def _classes(source: dict[str, Any]) -> tuple[str, ...] | None:
    """The class names of a checkpoint's dataset (None when the data cannot be read: the
    labels are then transformers' LABEL_k)."""
    from prunescope import data
    from prunescope.errors import PrunescopeError

    try:
        return data.from_spec(source).classes if source else None
    except PrunescopeError:
        return None


# -- shared ----------------------------------------------------------------------------------

EXPORTERS = {"compact": export_compact, "sparse": export_sparse, "onnx": export_onnx,
             "huggingface": export_huggingface}


def export(path: str | os.PathLike, out: str | os.PathLike, fmt: str) -> dict[str, Any]:
    """Write checkpoint ``path`` to ``out`` in format ``fmt`` (:data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return EXPORTERS[fmt](path, out)


def _masked_state(loaded: checkpoint.Checkpoint, path) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict with its mask applied (pruned weights exactly zero)."""
    state = dict(loaded.model)
    for name, keep in (loaded.mask or {}).items():
        if name not in state or state[name].shape != keep.shape:
            raise CheckpointError(f"{path} holds a mask for {name!r} that does not fit its "
                                  "weights; export a checkpoint written by prunescope")
        state[name] = state[name].masked_fill(~keep, 0)
    return state


def _sizes(fmt: str, path, out, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {"format": fmt, "out": str(out), "bytes": Path(out).stat().st_size,
            "checkpoint_bytes": Path(path).stat().st_size,
            "dense_bytes": sum(t.numel() * t.element_size() for t in state.values())}
