"""Logging: human-readable lines through the standard :mod:`logging` module, and optional
metric records for TensorBoard.

Every module logs to its own ``logging.getLogger(__name__)`` under the ``prunescope`` logger;
nothing prints. :func:`setup` (called by the command line; a library user configures logging as
usual) sends ``prunescope`` records to stderr through ``tqdm.write``, so a line logged while a
progress bar runs appears above it and stays on screen after the bar is gone; under
``torchrun`` only rank 0 speaks.

A :class:`MetricsLogger` receives every epoch's metrics record; :class:`TensorBoardLogger` writes
them, the learning rate and the sparsity of every masked layer as TensorBoard scalars (needs the
``tensorboard`` package: ``pip install 'prunescope[tensorboard]'``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from prunescope.errors import ConfigError

ROOT = "prunescope"


class _TqdmHandler(logging.StreamHandler):
    """Writes each record with ``tqdm.write`` (above any progress bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return os.environ.get("RANK", "0") == "0"


def setup(level: int = logging.INFO, stream=None) -> logging.Logger:
    """Route the ``prunescope`` logger to stderr (one line a record, warnings prefixed);
    idempotent: a second call replaces the handler."""
    import sys

    root = logging.getLogger(ROOT)
    for handler in [h for h in root.handlers if isinstance(h, _TqdmHandler)]:
        root.removeHandler(handler)
    handler = _TqdmHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter())
    handler.addFilter(_RankZero())
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    return root


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        return text


class MetricsLogger:
    """Receives each epoch's record; the base class discards it."""

    def log_epoch(self, tag: str, record: dict[str, Any], model, mask) -> None:
        """``record`` is the epoch's metrics line (``step``, ``lr``, losses, accuracies)."""

    def close(self) -> None:
        """Flush and release whatever the logger holds."""


class TensorBoardLogger(MetricsLogger):
    """Scalars under ``<tag>/``: every number of the record, and ``<tag>/sparsity/<layer>`` for
    each layer of the mask, at the record's optimizer step."""

    def __init__(self, logdir: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("TensorBoard logging needs the tensorboard package: "
                              "pip install 'prunescope[tensorboard]', or set log.tensorboard: "
                              "false") from None
        self.logdir = Path(logdir)
        self.writer = SummaryWriter(log_dir=str(self.logdir))

    def log_epoch(self, tag: str, record: dict[str, Any], model, mask) -> None:
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key not in ("epoch", "step") and isinstance(value, int | float):
                self.writer.add_scalar(f"{tag}/{key}", value, step)
        if mask is not None:
            for layer, sparsity in mask.sparsities().items():
                self.writer.add_scalar(f"{tag}/sparsity/{layer}", sparsity, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
