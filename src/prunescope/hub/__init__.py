"""Hugging Face transformers as prunescope models, and text datasets.

A model from a local transformers folder (``config.json`` + weights + tokenizer) runs through
every part of prunescope as it is: :mod:`prunescope.hub.models` wraps it with a task head as a
:class:`~prunescope.hub.models.TextClassifier` (state-dict names are the transformers ones),
rebuilds it from a checkpoint's metadata and writes it back as a folder that
``transformers.AutoModelForSequenceClassification.from_pretrained`` loads, with the mask beside
it. :mod:`prunescope.hub.text` tokenises text datasets into int64 ``[N, 2, L]`` tensors (token
ids and attention mask) and registers ``tweets``.

``transformers`` is an optional dependency (``pip install 'prunescope[transformers]'``; the
project's ``make`` set-up installs it); without it, asking for such a model or dataset is one
:class:`~prunescope.errors.ConfigError` line saying how to install it. Nothing is downloaded:
models and tokenizers load from local folders only (``HF_HUB_OFFLINE`` is set before import).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from prunescope.errors import ConfigError

INSTALL = "pip install 'prunescope[transformers]' (or run make, which installs it)"


def require_transformers() -> ModuleType:
    """The ``transformers`` module, imported offline, or a one-line ConfigError."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        module = importlib.import_module("transformers")
    except ImportError:
        raise ConfigError(f"Hugging Face models need the transformers package: {INSTALL}"
                          ) from None
    module.logging.set_verbosity_error()  # its load reports would drown prunescope's lines
    return module
