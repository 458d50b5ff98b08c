"""Sparse inference from a file: export a pruned model compactly, load it onto the kernels, run it.

:func:`export` writes a pruned model as a sparse inference file
(:mod:`prunescope.kernels.sparse_file`): its masked Linear and Conv2d layers as kept values and
indices, every other tensor dense. Masked layers the kernels do not run (other module types,
padding modes other than zeros, dtypes other than float32/float64) are stored dense, zeros
included, and one warning line names them.

:func:`load` verifies the file (one :class:`~prunescope.errors.CheckpointError` line for a
corrupt file, a file of another model, a layer kind the kernels do not run), builds the
architecture from the spec in the file on the ``meta`` device (no weight is allocated), puts an
inference layer holding only the compressed weight in place of each sparse layer (no dense
weight is materialised for it) and fills every other tensor from the file. The result, a
:class:`SparseModel`, runs under ``torch.inference_mode`` on the public kernel operators
(``torch.ops.prunescope_kernels.sparse_linear`` / ``sparse_conv2d``, whose no-grad path keeps
nothing for backward). Its outputs are those of the dense masked model (tested within 1e-5).
With an ``example`` batch, ``load`` applies the swap rule of :func:`prunescope.kernels.to_sparse`
to inference: a layer stays sparse only where it is measured faster than its dense form.

Per-call overhead: where ``torch.fx`` can trace the model (the registry models), the forward is
compiled into one straight-line Python function whose constants (the kernels' tensors, the
pooling arguments) are globals: no ``nn.Module`` call, attribute lookup or container walk is
left per layer, only the operator calls themselves; ReLU runs in place where nothing else reads
its input, and 2 x 2 max pooling as two elementwise maxima (:func:`max_pool_2x2`). When the
input shape is known (``example``, or a registry model's spec), chains of sparse layers keep
their activations in the kernels' own batch-innermost layout from one layer to the next
(:class:`_LanesCodegen`): ReLU fused into the layer before it, a convolution writing the next
one's zero padding or pooling its own output, the layout changed once on the way in and once on
the way out. A model ``torch.fx`` cannot trace (a Hugging Face transformer) runs its own module
tree with the inference layers in it. Measured figures: docs/inference.md.

Where the fast kernels are not available (no compiler, ``PRUNESCOPE_KERNELS=reference``; the
kernels print one warning line saying why) the sparse layers are densified at load and the model
runs dense: correct, dense speed.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunescope import files
from prunescope.errors import CheckpointError, ConfigError
from prunescope.kernels import formats, sparse_file
from prunescope.kernels.build import backend
from prunescope.kernels.sparse_file import SparseFile, SparseTensor

logger = logging.getLogger(__name__)

# -- export ----------------------------------------------------------------------------------


def export(model: nn.Module, mask: Mapping[str, torch.Tensor], out: str | os.PathLike, *,
           spec: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` with ``mask`` (``{parameter name: bool tensor}``, True = keep) as a sparse
    inference file ``out``; returns ``{"out", "bytes", "sparse_layers", "dense_layers"}``.

    ``spec`` is how to rebuild the architecture: a registry spec (``{"name", "num_classes",
    "in_channels", "image_size"}``) or a Hugging Face one (``{"source": "huggingface", ...}``;
    the model's config is added so that loading needs no model folder). ``meta`` (JSON-able,
    e.g. ``data``, ``source``) is stored beside it. Weights outside the mask are dropped; the
    model is not changed. A mask entry that is not a parameter of the model is a ConfigError.
    """
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    keep, dense = {}, []
    for name, tensor in mask.items():
        if name not in params or params[name].shape != tensor.shape:
            raise ConfigError(f"the mask holds {name!r} of shape {list(tensor.shape)}, which "
                              "is not a parameter of the model; pass the model's own mask")
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if leaf == "weight" and module is not None and sparse_file.layer_entry(module):
            keep[module_name] = tensor.to(torch.bool)
        else:
            dense.append(f"{name} ({_describe(module, leaf)})")
    if dense:
        warnings.warn(f"prunescope.kernels: no sparse kernel for {', '.join(dense)}; stored "
                      "dense (zeros included) and run dense", RuntimeWarning, stacklevel=2)
    zeroed = {n: params[n].detach().masked_fill(~k.to(torch.bool), 0) for n, k in mask.items()}
    sparse_file.write(out, model, keep, {**(meta or {}), "model": _full_spec(model, spec)},
                      replace=zeroed)
    return {"out": str(out), "bytes": os.path.getsize(out), "sparse_layers": list(keep),
            "dense_layers": dense}


def _describe(module: nn.Module | None, leaf: str) -> str:
    if module is None or leaf != "weight":
        return "not a layer weight"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"Conv2d with padding_mode={module.padding_mode!r}"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype not in sparse_file.FLOAT_DTYPES:
        return f"{type(module).__name__} in {weight.dtype}"
    return type(module).__name__


def _full_spec(model: nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
    """``spec``, with the transformers config of a Hugging Face model added."""
    if spec.get("source") != "huggingface":
        return dict(spec)
    net = getattr(model, "net", model)
    return {**spec, "config": net.config.to_dict(), "class": type(net).__name__}


# -- the inference layers ----------------------------------------------------------------------


def transpose(sparse: SparseTensor, groups: int = 1) -> dict[str, torch.Tensor]:
    """The kernels' index structure of ``sparse`` (:mod:`prunescope.kernels.formats`): ``ptr``
    (int64), ``idx`` (int32), and the weights grouped by global input channel (``cptr``,
    ``cperm``, ``crow``), computed from the CSR alone (no dense mask)."""
    counts = (sparse.ptr[1:] - sparse.ptr[:-1]).long()
    row = torch.repeat_interleave(torch.arange(sparse.rows), counts)
    return formats.index_structure(row, sparse.idx.long(), tuple(sparse.shape), groups)


class _InferenceLayer(nn.Module):
    """A sparse layer for inference only: the kept values and the kernels' index structure as
    buffers (nothing trains here), no mask, no dense weight."""

    def __init__(self, sparse: SparseTensor, bias: torch.Tensor | None, groups: int = 1) -> None:
        super().__init__()
        self.shape = sparse.shape
        self.register_buffer("values", sparse.values.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())
        for name, tensor in transpose(sparse, groups).items():
            self.register_buffer(name, tensor)

    def kernel_args(self) -> tuple:
        """The operators' arguments after the input: values, bias, ptr, idx, cptr, cperm,
        crow."""
        b = self._buffers
        return (b["values"], b["bias"], b["ptr"], b["idx"], b["cptr"], b["cperm"], b["crow"])

    @property
    def sparsity(self) -> float:
        return 1.0 - self._buffers["values"].numel() / math.prod(self.shape)


class InferenceLinear(_InferenceLayer):
    """``nn.Linear`` on the sparse kernels, inference only (any leading dimensions)."""

    def __init__(self, sparse: SparseTensor, bias: torch.Tensor | None) -> None:
        super().__init__(sparse, bias)
        self.out_features, self.in_features = sparse.shape
        self.op = backend().ops.sparse_linear.default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.op(x, *self.kernel_args())
        y = self.op(x.reshape(-1, self.in_features), *self.kernel_args())
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"sparsity={self.sparsity:.4f}")


class InferenceConv2d(_InferenceLayer):
    """``nn.Conv2d`` (zero padding) on the sparse kernels, inference only."""

    def __init__(self, sparse: SparseTensor, bias: torch.Tensor | None,
                 entry: dict[str, Any]) -> None:
        super().__init__(sparse, bias, entry["groups"])
        out_channels, per_group, kh, kw = sparse.shape
        self.geometry = [per_group * entry["groups"], out_channels, kh, kw, *entry["stride"],
                         *entry["pads"], *entry["dilation"], entry["groups"]]
        self.op = backend().ops.sparse_conv2d.default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, *self.kernel_args(), self.geometry)

    def extra_repr(self) -> str:
        return f"geometry={self.geometry}, sparsity={self.sparsity:.4f}"


# -- loading ---------------------------------------------------------------------------------


def load(path: str | os.PathLike, *, model: nn.Module | None = None, trace: bool = True,
         example: torch.Tensor | None = None, min_speedup: float = 1.1, repeats: int = 7,
         log: Callable[[str], None] | None = print) -> SparseModel:
    """The model of sparse inference file ``path``, ready to run (see the module docstring).

    ``model``: build into this architecture instead of the one the file names (a user-defined
    model; its tensors must have the names and shapes of the exported one, else one
    CheckpointError line says the file is for another model); it is filled in place.
    ``trace=False`` runs the module tree instead of the compiled forward (for profiling; the
    outputs are the same).

    ``example`` (a batch of inputs as the model will see them): each sparse layer is timed,
    dense and sparse, at the input shape it receives (the fastest of ``repeats`` interleaved
    runs, forward only, at the current thread count) and runs sparse only where
    ``sparse_ms * min_speedup <= dense_ms``, as :func:`prunescope.kernels.to_sparse` decides;
    the others get their dense weight back. The table is passed to ``log`` (None: silent) and
    kept as ``model.choices``. Without ``example`` every sparse layer runs sparse. The
    example's shape (else, for a registry model, its spec's input shape) also lets the compiled
    forward keep chains of sparse layers in the kernels' layout (:class:`_LanesCodegen`); a
    user-defined model loaded without ``example`` runs each layer on its own operator.
    """
    content = sparse_file.read(path)
    skeleton = model if model is not None else _in_file_dtype(
        _skeleton(content.meta["model"], path), content)
    if sparse_file.architecture(skeleton) != content.meta["architecture"]:
        what = _spec_text(content.meta["model"])
        if model is None:
            raise CheckpointError(f"{path} is corrupt: the model its metadata names ({what}) is "
                                  "not the one its tensors were exported from")
        raise CheckpointError(f"{path} is a sparse export of {what}, not of this model (other "
                              "tensor names, shapes or dtypes); load it without model=, or "
                              "export this model")
    fast = backend().fast
    for name, sparse in content.sparse.items():
        _place(skeleton, name, sparse, content, fast, path)
    _fill(skeleton, content, path)
    skeleton.eval()
    choices = (_choose(skeleton, content, example, min_speedup, repeats)
               if example is not None and fast else [])
    if choices and log is not None:
        log(format_choices(choices))
    loaded = SparseModel(skeleton, content.meta, trace=trace, example=example)
    loaded.choices = choices
    return loaded


def _spec_text(spec: dict[str, Any]) -> str:
    from prunescope.checkpoint import describe

    return describe({k: v for k, v in spec.items() if k not in ("config", "class")})


def _skeleton(spec: dict[str, Any], path) -> nn.Module:
    """The architecture of ``spec`` on the meta device (no weights allocated)."""
    if not spec:
        raise CheckpointError(f"{path} holds a user-defined model; load it with "
                              "prunescope.kernels.runtime.load(path, model=<an instance of it>)")
    try:
        with torch.device("meta"):
            if spec.get("source") == "huggingface":
                return _huggingface(spec)
            from prunescope import models

            return models.build(spec["name"], num_classes=spec["num_classes"],
                                in_channels=spec["in_channels"], image_size=spec["image_size"])
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{path} describes a model prunescope cannot build: "
                              f"{str(exc).splitlines()[0] if str(exc) else exc!r}") from None


def _in_file_dtype(skeleton: nn.Module, content: SparseFile) -> nn.Module:
    """The skeleton in the floating dtype of the file's tensors, where they share one (a
    float64 export rebuilds as float64; the spec does not name a dtype)."""
    floats = {t.dtype for t in content.dense.values() if t.is_floating_point()}
    floats |= {sparse.values.dtype for sparse in content.sparse.values()}
    return skeleton.to(floats.pop()) if len(floats) == 1 else skeleton


def _huggingface(spec: dict[str, Any]) -> nn.Module:
    from prunescope.hub import require_transformers
    from prunescope.hub.models import TextClassifier

    transformers = require_transformers()
    settings = dict(spec["config"])
    config = transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)
    net = transformers.AutoModelForSequenceClassification.from_config(config)
    if type(net).__name__ != spec["class"]:
        raise ConfigError(f"its config builds a {type(net).__name__}, not a {spec['class']}")
    net.eval()
    return TextClassifier(net, {k: v for k, v in spec.items() if k not in ("config", "class")})


def _place(model: nn.Module, name: str, sparse: SparseTensor, content: SparseFile, fast: bool,
           path) -> None:
    """Put the inference layer of ``name`` in place of the model's dense layer (or, without
    the fast kernels, fill the dense layer with the densified weight)."""
    entry = content.meta["layers"][name]
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{path} names a layer {name!r} the model does not have") from None
    if sparse_file.layer_entry(layer) != {k: v for k, v in entry.items() if k != "kept"}:
        raise CheckpointError(f"{path} describes layer {name!r} as {entry['kind']} "
                              f"{entry['shape']}, which does not fit the model's "
                              f"{type(layer).__name__}")
    bias = content.dense.get(f"{name}.bias")
    if not fast:
        layer.weight = nn.Parameter(sparse.dense(), requires_grad=False)
        return
    replacement = (InferenceLinear(sparse, bias) if entry["kind"] == "linear"
                   else InferenceConv2d(sparse, bias, entry))
    object.__setattr__(replacement, "dense_layer", layer)  # its meta-device dense form
    _swap(model, name, replacement)


def _swap(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    model.get_submodule(parent_name).register_module(leaf, layer)


def _fill(model: nn.Module, content: SparseFile, path) -> None:
    """Put every dense tensor of the file into the model (parameters frozen); the model then
    holds no tensor on the meta device."""
    sparse_biases = {f"{name}.bias" for name in content.sparse}
    slots = sparse_file._tensors(model)
    for name, tensor in content.dense.items():
        if name in sparse_biases and name not in slots:
            continue  # now a buffer of the inference layer
        if name not in slots or slots[name].shape != tensor.shape:
            raise CheckpointError(f"{path} holds a tensor {name!r} of shape "
                                  f"{list(tensor.shape)} that does not fit the model")
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor
    left = [n for n, t in sparse_file._tensors(model).items() if t.is_meta]
    if left:
        raise CheckpointError(f"{path} does not hold the model's tensor {left[0]!r}; export the "
                              "model again")


# -- the per-layer choice --------------------------------------------------------------------


def _choose(model: nn.Module, content: SparseFile, example: torch.Tensor, min_speedup: float,
            repeats: int) -> list[dict[str, Any]]:
    """Time every inference layer dense and sparse at the shape it receives on ``example``;
    put the dense layer back where the sparse one is not ``min_speedup`` times faster."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _InferenceLayer)}
    shapes: dict[str, torch.Size] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, args[0].shape)
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in layers.items()]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    choices = []
    for name, layer in layers.items():
        if name not in shapes:
            continue  # not reached by this input: stays sparse
        dense = _dense_layer(layer, content.sparse[name], content.dense.get(f"{name}.bias"))
        x = torch.randn(shapes[name], generator=torch.Generator().manual_seed(0),
                        dtype=layer.values.dtype)
        dense_ms, sparse_ms = _fastest({"dense": dense, "sparse": layer}, x, repeats)
        sparse = sparse_ms * min_speedup <= dense_ms
        if not sparse:
            _swap(model, name, dense)
        choices.append({"layer": name, "input": list(shapes[name]), "sparsity": layer.sparsity,
                        "dense_ms": dense_ms, "sparse_ms": sparse_ms, "sparse": sparse})
    return choices


def _dense_layer(layer: _InferenceLayer, sparse: SparseTensor,
                 bias: torch.Tensor | None) -> nn.Module:
    """The layer's dense form (its weight with zeros at pruned places), frozen."""
    dense = copy.deepcopy(layer.dense_layer)  # on the meta device: no memory until filled
    dense._parameters["weight"] = nn.Parameter(sparse.dense(), requires_grad=False)
    if bias is not None:
        dense._parameters["bias"] = nn.Parameter(bias, requires_grad=False)
    return dense


def _fastest(layers: dict[str, nn.Module], x: torch.Tensor, repeats: int
             ) -> tuple[float, float]:
    """The fastest of ``repeats`` round-robin forward passes of each layer on ``x``, in ms
    (the minimum estimates a layer's own cost while other processes compete for the cores)."""
    times: dict[str, list[float]] = {name: [] for name in layers}
    with torch.inference_mode():
        for layer in layers.values():
            layer(x)  # warm-up
        for _ in range(repeats):
            for name, layer in layers.items():
                start = time.perf_counter()
                layer(x)
                times[name].append((time.perf_counter() - start) * 1e3)
    return min(times["dense"]), min(times["sparse"])


def format_choices(choices: list[dict[str, Any]]) -> str:
    """The per-layer choice of :func:`load` as a table."""
    width = max(len("layer"), *(len(c["layer"]) for c in choices))
    lines = [f"prunescope.kernels: sparse inference layers ({backend().name} kernels, "
             f"{torch.get_num_threads()} threads, forward at the example's shapes)",
             f"{'layer':<{width}}  {'input':<18} sparsity  dense ms  sparse ms  speedup  choice"]
    for c in choices:
        shape = "x".join(map(str, c["input"]))
        speedup = c["dense_ms"] / max(c["sparse_ms"], 1e-9)
        lines.append(f"{c['layer']:<{width}}  {shape:<18} {c['sparsity']:>8.4f}  "
                     f"{c['dense_ms']:>8.3f}  {c['sparse_ms']:>9.3f}  {speedup:>6.1f}x  "
                     f"{'sparse' if c['sparse'] else 'dense (not faster)'}")
    return "\n".join(lines)


# -- running ---------------------------------------------------------------------------------


class SparseModel(nn.Module):
    """A model loaded from a sparse inference file: ``model(x)`` returns its outputs (no
    gradient), ``run(x)`` the same without the ``nn.Module`` call (the caller provides
    ``torch.inference_mode``). ``net`` is the module tree, ``meta`` the file's metadata."""

    def __init__(self, net: nn.Module, meta: dict[str, Any], *, trace: bool = True,
                 example: torch.Tensor | None = None) -> None:
        super().__init__()
        self.net = net
        self.meta = meta
        floats = [t.dtype for t in sparse_file._tensors(net).values() if t.is_floating_point()]
        text = (meta.get("model") or {}).get("source") == "huggingface"
        self.input_dtype = torch.int64 if text else (floats[0] if floats else torch.float32)
        if example is None:
            example = _registry_example(meta.get("model") or {}, self.input_dtype)
        self.compiled = compile_forward(net, example) if trace else None
        self.choices: list[dict[str, Any]] = []
        self.run: Callable[[torch.Tensor], torch.Tensor] = self.compiled or net.forward

    @property
    def sparse_layers(self) -> list[str]:
        return [n for n, m in self.net.named_modules() if isinstance(m, _InferenceLayer)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs for ``x`` (no gradient); a tensor of another dtype than the model takes
        is a ConfigError."""
        if x.dtype != self.input_dtype:
            raise ConfigError(f"the model takes {self.input_dtype} input, got {x.dtype}; "
                              f"convert it with x.to({self.input_dtype})")
        with torch.inference_mode():
            return self.run(x)


def compile_forward(net: nn.Module, example: torch.Tensor | None = None
                    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``net``'s forward as one straight-line function (see the module docstring), or None when
    ``torch.fx`` cannot trace it. With ``example`` (inputs of the shape the model takes; the
    batch size may differ), chains of sparse layers keep their activations in the lanes layout
    (:class:`_LanesCodegen`) for inputs of the example's rank."""
    try:
        graph = _Tracer().trace(net)
    except Exception:  # noqa: BLE001 - any tracing failure: run the module tree instead
        return None
    plain = _Codegen(net).build(graph)
    if plain is None or example is None or not backend().fast:
        return plain
    shapes = _shapes(net, graph, example)
    if shapes is None:
        return plain
    return _LanesCodegen(net, shapes, plain, example.dim()).build(graph) or plain


class _Tracer(torch.fx.Tracer):
    """Keeps torch.nn layers and the inference layers as single calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _InferenceLayer) or super().is_leaf_module(m, qualname)


_FRESH_OUTPUT = (_InferenceLayer, nn.Linear, nn.Conv2d, nn.BatchNorm2d)


class _Codegen:
    """Python source for an FX graph, every constant bound as a global of the function."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.globals: dict[str, Any] = {"torch": torch, "F": F}
        self.names: dict[torch.fx.Node, str] = {}

    def constant(self, value: Any) -> str:
        name = f"_k{len(self.globals)}"
        self.globals[name] = value
        return name

    def arg(self, value: Any) -> str:
        if isinstance(value, torch.fx.Node):
            return self.names[value]
        if isinstance(value, tuple):
            return "(" + "".join(self.arg(v) + ", " for v in value) + ")"
        if isinstance(value, list):
            return "[" + ", ".join(self.arg(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k!r}: {self.arg(v)}" for k, v in value.items()) + "}"
        if isinstance(value, bool | int | str) or value is None or (
                isinstance(value, float) and math.isfinite(value)):
            return repr(value)
        return self.constant(value)

    def call(self, callee: str, args: tuple, kwargs: dict) -> str:
        parts = [self.arg(a) for a in args] + [f"{k}={self.arg(v)}" for k, v in kwargs.items()]
        return f"{callee}({', '.join(parts)})"

    def module_call(self, node: torch.fx.Node) -> str:
        module = self.net.get_submodule(node.target)
        x = self.arg(node.args[0]) if node.args else None
        if isinstance(module, InferenceLinear) and len(node.args) == 1 and not node.kwargs:
            args = ", ".join(self.constant(t) for t in module.kernel_args())
            op, layer = self.constant(module.op), self.constant(module)
            return f"{op}({x}, {args}) if {x}.dim() == 2 else {layer}({x})"
        if isinstance(module, InferenceConv2d) and len(node.args) == 1 and not node.kwargs:
            args = ", ".join(self.constant(t) for t in module.kernel_args())
            return f"{self.constant(module.op)}({x}, {args}, {self.constant(module.geometry)})"
        if type(module) is nn.ReLU and len(node.args) == 1 and not node.kwargs:
            return f"torch.relu_({x})" if self.fresh(node.args[0]) else f"torch.relu({x})"
        if type(module) is nn.Flatten and len(node.args) == 1 and not node.kwargs:
            return f"torch.flatten({x}, {module.start_dim}, {module.end_dim})"
        if type(module) is nn.MaxPool2d and len(node.args) == 1 and not node.kwargs:
            pool = (module.kernel_size, module.stride, module.padding, module.dilation,
                    module.ceil_mode)
            if _pairs(pool) == ((2, 2), (2, 2), (0, 0), (1, 1), False) \
                    and not module.return_indices:
                return f"{self.constant(max_pool_2x2)}({x})"
            return "F.max_pool2d(" + x + ", " + ", ".join(self.arg(v) for v in pool) + ")"
        return self.call(self.constant(module), node.args, node.kwargs)

    def fresh(self, node: Any) -> bool:
        """Whether ``node``'s value is a new tensor that nothing else reads (so an in-place
        operation on it is safe): the output of a layer, used once."""
        return (isinstance(node, torch.fx.Node) and node.op == "call_module"
                and len(node.users) == 1
                and isinstance(self.net.get_submodule(node.target), _FRESH_OUTPUT))

    def line(self, node: torch.fx.Node) -> str:
        """The assignment computing ``node`` (not a placeholder or the output)."""
        name = self.names[node]
        if node.op == "get_attr":
            return f"{name} = {self.constant(_attribute(self.net, node.target))}"
        if node.op == "call_function":
            return f"{name} = {self.call(self.constant(node.target), node.args, node.kwargs)}"
        if node.op == "call_method":
            receiver, *rest = node.args
            return (f"{name} = {self.arg(receiver)}."
                    f"{self.call(node.target, tuple(rest), node.kwargs)}")
        return f"{name} = {self.module_call(node)}"

    def build(self, graph: torch.fx.Graph) -> Callable[[torch.Tensor], torch.Tensor] | None:
        lines, inputs = [], []
        for i, node in enumerate(graph.nodes):
            name = self.names[node] = f"v{i}"
            if node.op == "placeholder":
                if node.args:  # a default value: not the single-input forward this handles
                    return None
                inputs.append(name)
            elif node.op == "output":
                lines.append(f"return {self.arg(node.args[0])}")
            else:
                lines.append(self.line(node))
        if len(inputs) != 1:
            return None
        source = f"def forward({inputs[0]}):\n" + "".join(f"    {line}\n" for line in lines)
        scope: dict[str, Any] = {}
        exec(compile(source, "<prunescope sparse forward>", "exec"), self.globals, scope)  # noqa: S102
        function = scope["forward"]
        function.source = source
        return function


def _pairs(pool: tuple) -> tuple:
    """Pooling arguments with every int made a pair (the last, ceil_mode, kept)."""
    *sizes, ceil_mode = pool
    return (*(tuple(v) if isinstance(v, tuple | list) else (v, v) for v in sizes), ceil_mode)


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` (floor mode) as two elementwise maxima over strided views: the same
    values, NaN propagated alike, without the index bookkeeping of PyTorch's CPU pooling (47.6
    against 3.3 ms on Conv-2's [64, 64, 32, 32] activation, one thread: docs/inference.md)."""
    if x.dim() != 4:
        return F.max_pool2d(x, 2)
    n, c, h, w = x.shape
    if h % 2 or w % 2:
        x = x[:, :, : h - h % 2, : w - w % 2]
    v = x.reshape(n, c, h // 2, 2, w // 2, 2)
    rows = torch.maximum(v[:, :, :, 0], v[:, :, :, 1])
    return torch.maximum(rows[..., 0], rows[..., 1])


# -- the lanes layout --------------------------------------------------------------------------
# A chain of sparse layers keeps its activations batch-innermost ("lanes": [features, N] after a
# Linear, [C, H, W, N] after a Conv2d), the layout the kernels compute in, so that a chain changes
# layout once on the way in and once on the way out instead of packing and unpacking at every
# layer (the operators ``to_lanes``, ``from_lanes``, ``linear_lanes``, ``conv_lanes``,
# ``max_pool_lanes``, ``linear_chain``). ReLU is fused into the layer before it; a padded
# stride-1 convolution reads its input with the zero margins the convolution before it wrote; a
# convolution whose output only a 2 x 2 max pooling reads pools it itself; the first and the last
# Linear of a chain take and return the standard layout, and a run of Linear layers ending a
# chain is one ``linear_chain`` call; flatten is a view ([C, H, W, N] -> [C * H * W, N] is
# PyTorch's flatten order); dropout (eval), elementwise activations and dense Linear layers the
# swap rule kept run on lanes tensors as they are. Anything else reads the activation converted
# back.

_PASS_THROUGH = ("relu", "elementwise", "identity", "flatten", "pool", "linear")
# Activations that act on each element alone, so on a lanes tensor as on a standard one (run
# out of place: an in-place one could change a value another reader already converted).
_ELEMENTWISE_MODULES = (nn.ReLU6, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.CELU, nn.SELU,
                        nn.LeakyReLU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
                        nn.Mish)
_ELEMENTWISE_FUNCTIONS = (torch.tanh, torch.sigmoid, F.gelu, F.silu, F.elu, F.leaky_relu,
                          F.relu6, F.hardtanh, F.hardswish, F.softplus, F.mish)


def _registry_example(spec: dict[str, Any], dtype: torch.dtype) -> torch.Tensor | None:
    """Two zero images of the shape a registry model takes (None for other models)."""
    if spec.get("source") == "huggingface" or not {"in_channels", "image_size"} <= spec.keys():
        return None
    size = spec["image_size"]
    return torch.zeros(2, spec["in_channels"], size, size, dtype=dtype)


def _shapes(net: nn.Module, graph: torch.fx.Graph, example: torch.Tensor
            ) -> dict[torch.fx.Node, tuple[int, ...]] | None:
    """The shape of every tensor-valued node on (two rows of) ``example``, or None when the
    model does not run on it."""
    from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

    module = torch.fx.GraphModule(net, copy.deepcopy(graph))
    try:
        with torch.inference_mode():
            ShapeProp(module).propagate(example[:2])
    except Exception:  # noqa: BLE001 - a model that cannot run on the example: no lanes layout
        return None
    shapes = {}
    for mine, theirs in zip(graph.nodes, module.graph.nodes, strict=True):
        meta = theirs.meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata):
            shapes[mine] = tuple(meta.shape)
    return shapes


class _LanesCodegen(_Codegen):
    """The forward with chains of sparse layers in the lanes layout, for inputs of rank
    ``rank`` (others run ``plain``, the forward without it)."""

    def __init__(self, net: nn.Module, shapes: dict[torch.fx.Node, tuple[int, ...]],
                 plain: Callable, rank: int) -> None:
        super().__init__(net)
        self.shapes, self.plain, self.rank = shapes, plain, rank
        self.kinds: dict[torch.fx.Node, str] = {}
        self.lanes: set[torch.fx.Node] = set()
        self.fused: set[torch.fx.Node] = set()  # sparse layers that apply the next ReLU
        self.out_pad: dict[torch.fx.Node, list[int]] = {}  # convs writing the next one's margins
        self.prepadded: set[torch.fx.Node] = set()  # convs whose input comes with its margins
        self.std_out: set[torch.fx.Node] = set()  # Linear layers (and fused ReLUs) ending a chain
        self.pooled: dict[torch.fx.Node, torch.fx.Node] = {}  # pool -> the conv that does it
        self.chains: dict[torch.fx.Node, list[torch.fx.Node]] = {}  # last Linear -> its chain
        self.in_chain: set[torch.fx.Node] = set()  # nodes a linear_chain call computes
        self.converted: dict[torch.fx.Node, str] = {}  # node -> variable in the other layout
        self.lines: list[str] = []
        ops = backend().ops
        self.ops = {name: self.constant(getattr(ops, name).default)
                    for name in ("to_lanes", "from_lanes", "linear_lanes", "conv_lanes",
                                 "max_pool_lanes", "linear_chain")}

    def kind(self, node: torch.fx.Node) -> str | None:
        """What ``node`` is, for the lanes layout: ``sparse`` (a layer the lanes operators
        run), a pass-through kind, or None (runs in the standard layout)."""
        if not node.args or not isinstance(node.args[0], torch.fx.Node):
            return None
        shape = self.shapes.get(node.args[0])
        if shape is None:
            return None
        rest, kwargs = node.args[1:], node.kwargs
        if node.op == "call_module":
            module = self.net.get_submodule(node.target)
            if rest or kwargs:
                return None
            if isinstance(module, InferenceLinear) and len(shape) == 2:
                return "sparse"
            if isinstance(module, InferenceConv2d) and len(shape) == 4:
                return "sparse"
            if type(module) is nn.Linear and len(shape) == 2:
                return "linear"
            if type(module) is nn.ReLU:
                return "relu"
            if type(module) in _ELEMENTWISE_MODULES and not getattr(module, "inplace", False):
                return "elementwise"
            if type(module) in (nn.Dropout, nn.Identity) and not module.training:
                return "identity"
            if type(module) is nn.Flatten and (module.start_dim, module.end_dim) == (1, -1):
                return "flatten"
            if type(module) is nn.MaxPool2d and len(shape) == 4 and not module.return_indices \
                    and _pairs((module.kernel_size, module.stride, module.padding,
                                module.dilation, module.ceil_mode)) == \
                    ((2, 2), (2, 2), (0, 0), (1, 1), False):
                return "pool"
            return None
        if node.op == "call_function" and node.target in (torch.relu, F.relu) and not rest \
                and set(kwargs) <= {"inplace"}:
            return "relu"
        if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS and not rest \
                and not kwargs.get("inplace", False) \
                and all(not isinstance(v, torch.fx.Node) for v in kwargs.values()):
            return "elementwise"
        if node.op == "call_function" and node.target is torch.flatten and not kwargs \
                and rest in ((1,), (1, -1)):
            return "flatten"
        if node.op == "call_method" and node.target == "flatten" and not kwargs \
                and rest in ((1,), (1, -1)):
            return "flatten"
        return None

    def plan(self, nodes: list[torch.fx.Node]) -> None:
        """Choose the lanes nodes: a sparse layer whose input is in lanes, or whose output
        reaches another sparse layer through lanes nodes (a chain start), and the pass-through
        nodes reading a lanes node. A lone sparse layer stays standard (its own operator packs
        no more than the conversions would)."""
        self.kinds = {n: k for n in nodes if (k := self.kind(n)) is not None}

        def propagate(starts: set[torch.fx.Node]) -> set[torch.fx.Node]:
            lanes: set[torch.fx.Node] = set()
            for n in nodes:
                kind, source = self.kinds.get(n), n.args[0] if n.args else None
                if (kind == "sparse" and (n in starts or source in lanes)) or (
                        kind in _PASS_THROUGH and source in lanes):
                    lanes.add(n)
            return lanes

        candidates = propagate({n for n, k in self.kinds.items() if k == "sparse"})
        reaches: dict[torch.fx.Node, bool] = {}
        for n in reversed(nodes):
            reaches[n] = any(u in candidates and (self.kinds[u] == "sparse" or reaches[u])
                             for u in n.users)
        self.lanes = propagate({n for n in candidates
                                if self.kinds[n] == "sparse" and reaches[n]})
        for n in self.lanes:
            source = n.args[0]
            if self.kinds[n] == "relu" and self.kinds.get(source) == "sparse" \
                    and source in self.lanes and len(source.users) == 1:
                self.fused.add(source)
        for n in self.lanes:
            if self.is_linear(n):
                value = next(iter(n.users)) if n in self.fused else n
                if not any(u in self.lanes for u in value.users):
                    self.std_out.update({n, value})  # writes the standard layout itself
        for n in self.lanes:
            producer = self.padding_producer(n)
            if producer is not None:
                self.out_pad[producer] = self.net.get_submodule(n.target).geometry[6:10]
                self.prepadded.add(n)
        for n in self.lanes:
            conv = self.pooling_conv(n)
            if conv is not None:
                self.pooled[n] = conv
        for n in nodes:
            chain = self.linear_chain(n)
            if len(chain) >= 2:
                self.chains[n] = chain
                for member in chain[:-1]:
                    self.in_chain.add(member)
                    if member in self.fused:
                        self.in_chain.add(next(iter(member.users)))

    def is_sparse(self, node: torch.fx.Node, kind: type[_InferenceLayer]) -> bool:
        """Whether ``node`` is a sparse layer of ``kind`` running in the lanes layout."""
        return (node in self.lanes and self.kinds[node] == "sparse"
                and isinstance(self.net.get_submodule(node.target), kind))

    def is_linear(self, node: torch.fx.Node) -> bool:
        return self.is_sparse(node, InferenceLinear)

    def linear_chain(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        """The sparse Linear layers one ``linear_chain`` call computes, ending at ``node`` (a
        Linear returning the standard layout), each reading only the one before it (through
        at most a fused ReLU); [] when ``node`` ends none."""
        if not self.is_linear(node) or node not in self.std_out:
            return []
        chain = [node]
        while True:
            value = chain[0].args[0]
            previous = value.args[0] if (self.kinds.get(value) == "relu"
                                         and value.args[0] in self.fused) else value
            if not self.is_linear(previous) or len(value.users) != 1:
                return chain
            chain.insert(0, previous)

    def pooling_conv(self, node: torch.fx.Node) -> torch.fx.Node | None:
        """The sparse convolution that can pool its own output for ``node`` (a 2 x 2 max
        pooling whose input, through at most a fused ReLU, is read by nothing else), or
        None."""
        if self.kinds[node] != "pool":
            return None
        value = conv = node.args[0]
        if self.kinds.get(value) == "relu" and value.args[0] in self.fused:
            conv = value.args[0]
        if not self.is_conv(conv) or conv in self.out_pad or len(value.users) != 1:
            return None
        return conv

    def padding_producer(self, node: torch.fx.Node) -> torch.fx.Node | None:
        """The sparse convolution that can write ``node``'s zero padding (``node`` a padded
        stride-1 sparse convolution reading, through at most a fused ReLU, only its output),
        or None."""
        if not self.is_conv(node):
            return None
        geometry = self.net.get_submodule(node.target).geometry
        if geometry[5] != 1 or not any(geometry[6:10]):
            return None
        source = node.args[0]
        if self.kinds.get(source) == "relu" and source.args[0] in self.fused:
            if len(source.users) != 1:
                return None
            source = source.args[0]
        if source in self.lanes and self.is_conv(source) and len(source.users) == 1:
            return source
        return None

    def is_conv(self, node: torch.fx.Node) -> bool:
        return self.is_sparse(node, InferenceConv2d)

    def arg(self, value: Any) -> str:
        if isinstance(value, torch.fx.Node) and value in self.lanes - self.std_out:
            return self.convert(value, self.ops["from_lanes"])
        return super().arg(value)

    def lanes_arg(self, node: torch.fx.Node) -> str:
        """The variable holding ``node``'s value in the lanes layout."""
        if node in self.lanes:
            return self.names[node]
        return self.convert(node, self.ops["to_lanes"])

    def convert(self, node: torch.fx.Node, op: str) -> str:
        if node not in self.converted:
            name = self.converted[node] = f"{self.names[node]}_t"
            self.lines.append(f"{name} = {op}({self.names[node]})")
        return self.converted[node]

    def lanes_call(self, node: torch.fx.Node) -> str:
        kind, source = self.kinds[node], node.args[0]
        if kind == "relu" and source in self.fused:
            return self.names[source]
        if node in self.pooled:
            return self.names[self.pooled[node]]
        if kind == "sparse":
            return self.sparse_call(node, source)
        x = self.lanes_arg(source)
        if kind == "relu":
            return f"torch.relu({x})"
        if kind == "elementwise" and node.op == "call_module":
            return f"{self.constant(self.net.get_submodule(node.target))}({x})"
        if kind == "elementwise":  # a function: its keyword arguments are constants
            keywords = "".join(f", {k}={self.arg(v)}" for k, v in node.kwargs.items())
            return f"{self.constant(node.target)}({x}{keywords})"
        if kind == "identity":
            return x
        if kind == "flatten":
            return f"{x}.flatten(0, -2)"
        if kind == "pool":
            return f"{self.ops['max_pool_lanes']}({x})"
        module = self.net.get_submodule(node.target)  # a dense Linear: W x (+ b)
        weight = self.constant(module.weight)
        if module.bias is None:
            return f"torch.mm({weight}, {x})"
        return f"torch.addmm({self.constant(module.bias.unsqueeze(1))}, {weight}, {x})"

    def chain_call(self, chain: list[torch.fx.Node]) -> str:
        """One ``linear_chain`` call for the Linear layers of ``chain``."""
        source = chain[0].args[0]  # standard or lanes: linear_chain takes either, as is
        tensors, widths, relus = [], [], []
        for node in chain:
            module = self.net.get_submodule(node.target)
            values, bias, ptr, idx = module.kernel_args()[:4]
            if bias is None:
                bias = torch.empty(0, dtype=values.dtype)
            tensors += [self.constant(t) for t in (values, bias, ptr, idx)]
            widths.append(module.in_features)
            relus.append(int(node in self.fused))
        return (f"{self.ops['linear_chain']}({self.names[source]}, [{', '.join(tensors)}], "
                f"{widths}, {relus}, {source not in self.lanes})")

    def sparse_call(self, node: torch.fx.Node, source: torch.fx.Node) -> str:
        if node in self.chains:
            return self.chain_call(self.chains[node])
        module = self.net.get_submodule(node.target)
        args = ", ".join(self.constant(t) for t in module.kernel_args()[:4])
        relu = node in self.fused
        if isinstance(module, InferenceLinear):  # standard or lanes input, as is
            return (f"{self.ops['linear_lanes']}({self.names[source]}, {args}, "
                    f"{module.in_features}, {relu}, {source not in self.lanes}, "
                    f"{node in self.std_out})")
        geometry = list(module.geometry)
        if node in self.prepadded:
            geometry[6:10] = [0, 0, 0, 0]
        return (f"{self.ops['conv_lanes']}({self.lanes_arg(source)}, {args}, "
                f"{self.constant(geometry)}, {relu}, {self.constant(self.out_pad.get(node, []))}, "
                f"{node in self.pooled.values()})")

    def build(self, graph: torch.fx.Graph) -> Callable[[torch.Tensor], torch.Tensor] | None:
        nodes = list(graph.nodes)
        self.plan(nodes)
        if not any(self.kinds[n] == "sparse" and n.args[0] in self.lanes for n in self.lanes):
            return None  # no chain: nothing to gain
        inputs = [n for n in nodes if n.op == "placeholder"]
        if len(inputs) != 1 or inputs[0].args:
            return None
        for i, node in enumerate(nodes):
            self.names[node] = f"v{i}"
        self.lines = [f"if {self.names[inputs[0]]}.dim() != {self.rank}:",
                      f"    return {self.constant(self.plain)}({self.names[inputs[0]]})"]
        for node in nodes:
            name = self.names[node]
            if node in self.in_chain:
                continue  # computed inside the linear_chain call of its chain's last layer
            if node in self.lanes:
                line = f"{name} = {self.lanes_call(node)}"
            elif node.op in ("placeholder", "output"):
                line = (f"return {self.arg(node.args[0])}" if node.op == "output" else None)
            else:
                line = self.line(node)
            if line is not None:
                self.lines.append(line)
        source = (f"def forward({self.names[inputs[0]]}):\n"
                  + "".join(f"    {line}\n" for line in self.lines))
        scope: dict[str, Any] = {}
        exec(compile(source, "<prunescope sparse forward, lanes>", "exec"), self.globals,  # noqa: S102
             scope)
        function = scope["forward"]
        function.source = source
        return function


def _attribute(net: nn.Module, target: str) -> Any:
    owner, _, leaf = target.rpartition(".")
    return getattr(net.get_submodule(owner), leaf)


# -- evaluation ------------------------------------------------------------------------------


def evaluate(path: str | os.PathLike, split: str = "test", data_root: str | None = None, *,
             batch_size: int = 1000, log: Callable[[str], None] | None = logger.info
             ) -> dict[str, Any]:
    """Accuracy and loss of the model in sparse inference file ``path`` on one split of the
    dataset its metadata names, run from the file on the kernels, each layer sparse where
    measured faster on the first batch (:func:`load` with ``example``; the table goes to
    ``log``); adds ``seconds`` (the pass over the split) and ``sparse_layers``."""
    from prunescope import data

    source = files.read_meta(path).get("data")  # load verifies the whole file
    if not source:
        raise CheckpointError(f"{path} does not say which dataset its model was trained on")
    subset = getattr(data.from_spec(source, data_root), split)
    model = load(path, example=subset.x[:batch_size] if len(subset) else None, log=log)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = [model.run(subset.x[i:i + batch_size]).float()
                  for i in range(0, len(subset), batch_size)]
    seconds = time.perf_counter() - start
    logits = torch.cat(logits) if logits else torch.zeros(0)
    scores = ({"loss": math.nan, "accuracy": math.nan} if len(subset) == 0 else
              {"loss": F.cross_entropy(logits, subset.y).item(),
               "accuracy": (logits.argmax(1) == subset.y).double().mean().item()})
    return {"file": str(path), "split": split, **scores, "seconds": seconds,
            "sparse_layers": model.sparse_layers, "engine": f"prunescope.kernels "
            f"({backend().name})"}


__all__ = ["InferenceConv2d", "InferenceLinear", "SparseModel", "compile_forward", "evaluate",
           "export", "format_choices", "load", "max_pool_2x2", "transpose"]
