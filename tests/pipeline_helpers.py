"""Shared helpers of the training / checkpoint / recipe / CLI tests.

Everything here is tiny on purpose: the bundled ``digits`` dataset (8x8 images) with a small
validation split, ``lenet300`` sized for it, one to three epochs of batch 64; or a few random
tensors wrapped in :class:`prunescope.data.Splits` for unit tests.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from prunescope import data, models
from prunescope.cli import main
from prunescope.data import Splits, Subset

DIGITS_VAL_SIZE = 100

TINY_RECIPE: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "data": {"name": "digits", "val_size": DIGITS_VAL_SIZE},
    "model": {"name": "lenet300"},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.1, "lr_schedule": "cosine"},
    "prune": {
        "methods": [
            {"criterion": "magnitude", "allocation": "global"},
            {"criterion": "random", "allocation": "erk"},
        ],
        "sparsities": [0.5, 0.9],
        "batches": 2,
        "batch_size": 64,
    },
    "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
}


def recipe_dict(**changes: Any) -> dict[str, Any]:
    """A deep copy of :data:`TINY_RECIPE`; ``changes`` replace top-level keys (None drops one)."""
    raw = copy.deepcopy(TINY_RECIPE)
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


def write_recipe(path: Path, **changes: Any) -> Path:
    """Write the tiny recipe (see :func:`recipe_dict`) as YAML to ``path``; returns ``path``."""
    path.write_text(yaml.safe_dump(recipe_dict(**changes), sort_keys=False), encoding="utf-8")
    return path


@lru_cache(maxsize=1)
def digits() -> Splits:
    """The digits splits used by the training tests (loaded once; never modified in place)."""
    return data.load("digits", val_size=DIGITS_VAL_SIZE, seed=0)


def lenet(seed: int = 0) -> nn.Module:
    """``lenet300`` for 1x8x8 digits, initialised from ``seed``."""
    torch.manual_seed(seed)
    return models.build("lenet300", num_classes=10, in_channels=1, image_size=8)


def tiny_splits(n_train: int = 48, n_eval: int = 16, num_classes: int = 3,
                seed: int = 0) -> Splits:
    """Random 1x4x4 images with random labels (for loop mechanics, not for learning)."""
    generator = torch.Generator().manual_seed(seed)

    def subset(n: int) -> Subset:
        x = torch.randn(n, 1, 4, 4, generator=generator)
        y = torch.randint(0, num_classes, (n,), generator=generator)
        return Subset(x, y, torch.arange(n))

    return Splits(name="tiny", train=subset(n_train), val=subset(n_eval), test=subset(n_eval),
                  num_classes=num_classes, input_shape=(1, 4, 4),
                  classes=tuple(str(i) for i in range(num_classes)), mean=(0.0,), std=(1.0,))


def tiny_mlp(seed: int = 0, num_classes: int = 3) -> nn.Module:
    """Flatten, Linear(16, 12), ReLU, Linear(12, ``num_classes``) for :func:`tiny_splits`."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, num_classes))


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same keys and bitwise-equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``prunescope ARGS`` in-process: ``(exit code, stdout, stderr)``.

    argparse's own exits (``--help``, usage errors) arrive as SystemExit and become codes too.
    """
    capsys.readouterr()  # drop anything captured before
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, *, only_line: bool = True) -> str:
    """Exit code 2, no traceback, and one ``error: `` line on stderr; returns that line.

    With ``only_line`` the error is the only thing on stderr; otherwise progress lines may come
    before it but it is still the last line and the only error line.
    """
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip("\n").splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    if only_line:
        assert lines == errors, err
    return errors[0]


def files_under(path: Path) -> list[str]:
    """Every file below ``path`` (relative, sorted); empty when ``path`` does not exist."""
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
