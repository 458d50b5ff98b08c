"""Fixed-mask training on the sparse layers: what ``finetune.sparse_kernels`` switches on.

:func:`sparse_layers` wraps one :func:`prunescope.train.fit` call whose hook holds a fixed mask
(a plain :class:`~prunescope.sparsifier.MaskHold`: one-shot fine-tuning, ``prunescope prune
--finetune-epochs``, sparse transfer). On entry it swaps the layers measured faster
(:func:`~prunescope.kernels.to_sparse`, on a training batch, forward + backward) and prints the
choice; inside, the hook holds the mask on the layers left dense only (the sparse layers have no
pruned weights to hold); on exit the model is plain ``nn.Linear``/``nn.Conv2d`` again with the
trained weights. The choice (and the timing table) is written to ``run_dir/sparse_layers.json``,
and a resumed run swaps the same layers without timing, since its optimizer state has their
shapes. Under
``torchrun`` rank 0 times and every rank swaps what rank 0 chose.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from prunescope import distributed
from prunescope.errors import ConfigError
from prunescope.files import write_json
from prunescope.kernels.swap import Example, to_dense, to_sparse
from prunescope.mask import Mask
from prunescope.sparsifier import MaskHold

PLAN = "sparse_layers.json"


class _ResidualHold(MaskHold):
    """Holds ``mask`` where the layers stayed dense; ``mask`` is still the whole model's (what
    checkpoints save and metrics report)."""

    def __init__(self, mask: Mask, residual: Mask | None) -> None:
        super().__init__(mask)
        self.residual = residual

    def held(self) -> Mask | None:
        return self.residual


@contextlib.contextmanager
def sparse_layers(model: nn.Module, hook: object, example: Example, run_dir: Path, *,
                  resuming: bool) -> Iterator[MaskHold]:
    """Swap ``model``'s faster layers to sparse for the block; yields the hook to train with.

    ``hook`` must be a plain :class:`MaskHold` with a mask (methods that change the mask while
    training cannot use fixed sparse structures). ``example`` is one training batch of model
    inputs (a tensor, a tuple, or a mapping such as a tokenizer's output). With
    ``resuming`` and a saved choice in ``run_dir``, the same layers are swapped again.
    """
    if type(hook) is not MaskHold or hook.mask is None:
        raise ConfigError(
            "sparse_kernels needs a fixed mask (fine-tuning after one-shot pruning, or prune "
            "--finetune-epochs); sparse-training methods change the mask as they train"
        )
    mask = hook.mask
    mask.apply_(model)
    plan_path = Path(run_dir) / PLAN
    layers, plan = _saved(plan_path) if resuming else None, None
    if layers is None:
        plan = to_sparse(model, mask, example, log=_log, verbose=distributed.is_writer())
        layers = _agreed(plan.swapped, mask)
        write_json(plan_path, {"sparse_layers": layers, "table": plan.table()})  # rank 0 writes
    if plan is None or layers != plan.swapped:  # resumed, or this rank measured differently
        plan = to_sparse(model, mask, layers=layers, verbose=False)
    try:
        yield _ResidualHold(mask, plan.residual)
    finally:
        to_dense(model)


def _saved(path: Path) -> list[str] | None:
    if not path.exists():
        return None
    try:
        layers = json.loads(path.read_text(encoding="utf-8"))["sparse_layers"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path} is not a sparse-layer choice; delete it to re-measure") from None
    return [str(name) for name in layers]


def _agreed(swapped: list[str], mask: Mask) -> list[str]:
    """Rank 0's choice on every process (timings differ between processes)."""
    if not distributed.active():
        return swapped
    modules = [name.rpartition(".")[0] for name in mask]
    flags = distributed.broadcast_bool(
        {name: torch.tensor(name in swapped) for name in modules})
    return [name for name in modules if bool(flags[name])]


def _log(text: str) -> None:
    print(text, file=sys.stderr)
