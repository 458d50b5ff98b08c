"""Second-order sample erasure (SSSE): remove training samples' influence without retraining.

Peste, Alistarh & Lampert (2021), "SSSE: Efficiently Erasing Samples from Trained Machine
Learning Models" (arXiv 2107.03860). A model trained to ``theta*`` on ``n`` samples is moved
towards the model trained without the ``k`` samples of an erasure set ``S`` by one Newton step
of the retained loss, with the Hessian replaced by the empirical Fisher ``F`` of the training
loss at ``theta*``:

    theta <- theta* + eps / (n - k) * F^-1 sum_{i in S} grad l_i(theta*)

(the gradient of the mean retained loss at ``theta*`` is ``-1/(n-k) sum_S grad l_i``, because
the full loss is stationary there). ``eps`` is the paper's step-size hyper-parameter (1 is the
plain Newton step). The empirical Fisher of a well-fit model is far smaller than its Hessian
(squared small gradients), so the plain step overshoots: on MNIST LeNet-300-100 the default
``eps = 1e-3`` closes about half of the gap to retraining, ``eps = 1`` destroys the model
(docs/erasure.md). ``F^-1`` is computed once, from a sample of training gradients, and kept
(:class:`InverseFisher`); each erasure then costs only the gradients of the erased samples.

The Fisher is prunescope's WoodFisher one (:mod:`prunescope.second_order.fisher`): block
diagonal (each tensor flattened and cut into blocks), ``F + lambda I`` with
``lambda = dampening * mean(diag F)``, float64 Cholesky inverses, and the same memory check.
On a sparse model the gradient coordinates of pruned weights are dropped, both in the Fisher and
in the erased gradient: the step is the Newton step of the loss restricted to the kept weights,
and pruned weights stay exactly zero (they are also projected to zero after the step).

:func:`erase_checkpoint` is ``prunescope erase``: it erases a class or a group (or a seeded
fraction of either) or listed training indices from a checkpoint and writes the erased model
and a result with accuracy on the erased, retained and test samples and the erased-vs-unseen
loss gap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunescope.data.base import Subset
from prunescope.errors import ConfigError, DataError
from prunescope.mask import Mask
from prunescope.second_order.fisher import (
    check_memory,
    dampened_inverse,
    empirical_fisher,
    mean_diagonal,
)
from prunescope.targets import parameters

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

EPSILON = 1e-3  # chosen on MNIST LeNet-300-100 (docs/erasure.md); 1 is the plain Newton step
DAMPENING = 0.1
BLOCK_SIZE = 128
FISHER_SAMPLES = 1024
BATCH_SIZE = 256
logger = logging.getLogger(__name__)


# -- the precomputed inverse ---------------------------------------------------------------------

def trainable(model: nn.Module) -> list[str]:
    """Names of the model's distinct trainable parameters (a tied tensor once), in order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def block_sizes(model: nn.Module, names: Sequence[str], cap: int) -> dict[str, int]:
    """Per tensor, the largest divisor of its size that is at most ``cap`` (so every tensor,
    biases included, is cut into equal blocks)."""
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ConfigError(f"erasure block size must be a positive integer, got {cap!r}")
    params = parameters(model)
    return {n: max(d for d in range(1, min(params[n].numel(), cap) + 1)
                   if params[n].numel() % d == 0) for n in names}


def check_fits(model: nn.Module, names: Sequence[str], block_size: int,
               memory_limit: int | None = None) -> dict[str, int]:
    """The block sizes, after checking (without allocating) that the Fisher work fits in
    ``memory_limit`` bytes (default: the memory available); PruningError naming the size
    needed otherwise."""
    params = parameters(model)
    blocks = block_sizes(model, names, block_size)
    check_memory({n: (params[n].numel(), b) for n, b in blocks.items()}, memory_limit,
                  label="erasure's Fisher", advice="erase from a smaller model")
    return blocks


def sample_batches(subset: Subset, count: int, *, seed: int = 0,
                   batch_size: int = BATCH_SIZE) -> list[Batch]:
    """``min(count, len(subset))`` examples drawn without replacement (seeded), in batches."""
    if count < 1:
        raise ConfigError(f"the Fisher needs at least one gradient sample, got {count}")
    order = torch.randperm(len(subset), generator=torch.Generator().manual_seed(seed))[:count]
    chosen = subset.select(order)
    return [(chosen.x[i:i + batch_size], chosen.y[i:i + batch_size])
            for i in range(0, len(chosen), batch_size)]


@dataclass(frozen=True)
class InverseFisher:
    """``(F + lambda I)^-1`` of a trained model, block-diagonal, ready for erasures.

    ``inverses[name]`` holds the ``[numel / B, B, B]`` float64 diagonal blocks of the flattened
    tensor ``name``; ``keep[name]`` is the bool mask of the weights the step may move (all True
    on a dense tensor); ``train_size`` is ``n``, the number of samples the model was trained on;
    ``lam`` the absolute dampening; ``samples`` the number of gradients the Fisher averages.
    """

    keep: dict[str, torch.Tensor]
    inverses: dict[str, torch.Tensor]
    train_size: int
    lam: float
    samples: int

    @classmethod
    def build(cls, model: nn.Module, train: Subset, *, mask: Mask | None = None,
              names: Sequence[str] | None = None, block_size: int = BLOCK_SIZE,
              dampening: float = DAMPENING, samples: int = FISHER_SAMPLES, seed: int = 0,
              train_size: int | None = None, memory_limit: int | None = None,
              loss_fn: LossFn = F.cross_entropy) -> InverseFisher:
        """The inverse Fisher of ``model`` from ``samples`` training examples of ``train``.

        ``names``: the tensors the erasure moves (default: every trainable parameter);
        ``mask``: pruned weights to hold at zero; ``train_size``: ``n`` (default
        ``len(train)``). ``loss_fn(logits, targets)`` is the batch-mean training loss (the
        Fisher calls it on one example at a time).
        """
        if not dampening > 0:
            raise ConfigError(f"erasure dampening must be > 0, got {dampening}")
        names = list(names) if names is not None else trainable(model)
        blocks = check_fits(model, names, block_size, memory_limit)
        keep = _keep(model, names, mask)
        batches = sample_batches(train, samples, seed=seed)
        fisher = empirical_fisher(model, keep, blocks, batches, loss_fn)
        lam = dampening * mean_diagonal(fisher)
        inverses = {n: dampened_inverse(fisher.pop(n), lam) for n in list(fisher)}
        return cls(keep, inverses, len(train) if train_size is None else train_size, lam,
                   sum(len(x) for x, _ in batches))

    def step(self, gradient: dict[str, torch.Tensor], erased: int,
             epsilon: float = EPSILON) -> dict[str, torch.Tensor]:
        """``eps / (n - k) * F^-1 g`` per tensor for the summed erased gradient ``g``
        (``{name: tensor}``), zero on pruned weights; float64, on the CPU."""
        if not 0 < erased < self.train_size:
            raise ConfigError(f"cannot erase {erased} of {self.train_size} training samples: "
                              "erase at least one and fewer than all")
        scale = epsilon / (self.train_size - erased)
        steps = {}
        for name, inverse in self.inverses.items():
            keep = self.keep[name].cpu()
            g = gradient[name].detach().double().cpu() * keep
            moved = inverse @ g.reshape(inverse.shape[0], -1, 1)
            steps[name] = (scale * moved).reshape(g.shape) * keep
        return steps


def _keep(model: nn.Module, names: Sequence[str], mask: Mask | None) -> dict[str, torch.Tensor]:
    """The mask of each tensor (all True for tensors the mask does not name)."""
    params = parameters(model)
    if mask is not None:
        mask.check(model)
        unknown = sorted(set(mask) - set(names))
        if unknown:
            raise ConfigError(f"the mask names {unknown[0]!r}, which the erasure does not move; "
                              "erase with names that include every masked tensor")
    return {n: (mask[n].to(params[n].device) if mask is not None and n in mask
                else torch.ones_like(params[n], dtype=torch.bool)) for n in names}


# -- the erasure step ----------------------------------------------------------------------------

def erased_gradient(model: nn.Module, names: Sequence[str], samples: Subset,
                    loss_fn: LossFn = F.cross_entropy, batch_size: int = BATCH_SIZE
                    ) -> dict[str, torch.Tensor]:
    """``sum_{i in samples} grad l_i(theta)`` per tensor (float64), the model in eval mode as
    in the Fisher. Only the sum is needed, so it is one backward pass per batch of the
    batch-mean loss ``loss_fn`` times the batch size, not a per-example computation."""
    params = parameters(model)
    tensors = [params[n] for n in names]
    device = tensors[0].device
    total = [torch.zeros_like(t, dtype=torch.float64) for t in tensors]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(samples), batch_size):
            x, y = samples.x[start:start + batch_size], samples.y[start:start + batch_size]
            loss = loss_fn(model(x.to(device)), y.to(device)) * len(x)
            for acc, g in zip(total, torch.autograd.grad(loss, tensors), strict=True):
                acc += g.double()
    finally:
        model.train(was_training)
    return dict(zip(names, total, strict=True))


@torch.no_grad()
def erase(model: nn.Module, samples: Subset, inverse: InverseFisher, *,
          epsilon: float = EPSILON, loss_fn: LossFn = F.cross_entropy
          ) -> dict[str, torch.Tensor]:
    """Erase ``samples`` from ``model`` in place with the SSSE step; returns the step.

    ``inverse`` is the model's precomputed :class:`InverseFisher` (at the same weights);
    pruned weights (``inverse.keep`` False) stay exactly zero. ``loss_fn(logits, targets)``
    is the batch-mean training loss.
    """
    if len(samples) == 0:
        raise ConfigError("the erasure set is empty: name at least one training sample")
    with torch.enable_grad():
        gradient = erased_gradient(model, list(inverse.inverses), samples, loss_fn)
    steps = inverse.step(gradient, len(samples), epsilon)
    params = parameters(model)
    for name, delta in steps.items():
        param = params[name]
        param.add_(delta.to(device=param.device, dtype=param.dtype))
        param.masked_fill_(~inverse.keep[name].to(param.device), 0.0)
    return steps


# -- choosing the erasure set --------------------------------------------------------------------

def class_positions(train: Subset, label: int, classes: Sequence[str], *,
                    fraction: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Positions in ``train`` of a seeded ``fraction`` (rounded, at least one) of class
    ``label``'s examples, sorted."""
    _check_fraction(fraction)
    if not 0 <= label < len(classes):
        raise ConfigError(f"class {label} is not in the label space 0..{len(classes) - 1}; "
                          "choose one of them")
    members = (train.y == label).nonzero().squeeze(1)
    if len(members) == 0:
        raise ConfigError(f"class {label} has no training sample to erase; choose another class")
    return _seeded_fraction(members, fraction, seed)


def group_positions(train: Subset, group: int, group_names: Sequence[str], *,
                    fraction: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Positions in ``train`` of a seeded ``fraction`` (rounded, at least one) of the examples
    of group ``group`` (``train.groups``, named by ``group_names``), sorted; drawn as for a
    class (:func:`class_positions`)."""
    _check_fraction(fraction)
    if train.groups is None or not group_names:
        raise ConfigError("this dataset has no groups; erase by --class or --samples")
    if not 0 <= group < len(group_names):
        raise ConfigError(f"group {group} is not one of the dataset's groups "
                          f"0..{len(group_names) - 1} ({', '.join(group_names)}); choose one")
    members = (train.groups == group).nonzero().squeeze(1)
    if len(members) == 0:
        raise ConfigError(f"group {group_names[group]!r} has no training sample to erase; "
                          "choose another group")
    return _seeded_fraction(members, fraction, seed)


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise ConfigError(f"--fraction must be in (0, 1], got {fraction}")


def _seeded_fraction(members: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A seeded ``fraction`` (rounded, at least one) of ``members``, sorted."""
    count = max(1, round(fraction * len(members)))
    order = torch.randperm(len(members), generator=torch.Generator().manual_seed(seed))
    return members[order[:count]].sort().values


def parse_class(text: str, classes: Sequence[str]) -> int:
    """A class given as its index or its name."""
    return _parse_name(text, classes, "class", "the label space", "a class index or name")


def parse_group(text: str | int, group_names: Sequence[str]) -> int:
    """A group given as its index or its name (:attr:`Splits.group_names`); ConfigError for a
    dataset without groups or a name it does not hold."""
    if not group_names:
        raise ConfigError("this dataset has no groups; erase by --class or --samples")
    return _parse_name(str(text), group_names, "group", "the dataset's groups",
                       "a group index or name")


def _parse_name(text: str, names: Sequence[str], what: str, space: str, advice: str) -> int:
    """``text`` as the position of a name in ``names``, else as an integer."""
    if text in names:
        return list(names).index(text)
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not in {space} ({', '.join(names)}); "
                          f"give {advice}") from None


def read_positions(path: Path, size: int) -> torch.Tensor:
    """Training-split positions from a file: a JSON list, or integers separated by whitespace
    or commas. Each must be in ``0..size-1`` and appear once."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the sample file {path}: {exc}") from None
    try:
        values = (json.loads(text) if str(path).endswith(".json")
                  else [int(t) for t in text.replace(",", " ").split()])
    except ValueError:
        raise DataError(f"{path} must hold integer training indices (a JSON list, or "
                        "separated by spaces, commas or newlines)") from None
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise DataError(f"{path} must hold a list of integer training indices")
    if not values:
        raise ConfigError(f"the erasure set in {path} is empty: list at least one index")
    outside = [v for v in values if not 0 <= v < size]
    if outside:
        raise ConfigError(f"index {outside[0]} in {path} is not in the training split "
                          f"(0..{size - 1}); give positions in the checkpoint's training split")
    positions = torch.tensor(values, dtype=torch.int64)
    if len(positions.unique()) != len(positions):
        first = next(v for i, v in enumerate(values) if v in values[:i])
        raise ConfigError(f"index {first} appears twice in {path}; list each sample once")
    return positions.sort().values


# -- the checkpoint command ----------------------------------------------------------------------

@dataclass(frozen=True)
class EraseSpec:
    """Settings of ``prunescope erase`` (see :class:`InverseFisher` and :func:`erase`)."""

    epsilon: float = EPSILON
    dampening: float = DAMPENING
    block_size: int = BLOCK_SIZE
    fisher_samples: int = FISHER_SAMPLES
    seed: int = 0


def erase_checkpoint(path: Path, out: Path, *, label: str | None = None,
                     samples: Path | None = None, group: str | int | None = None,
                     fraction: float = 1.0, spec: EraseSpec = EraseSpec(),
                     data_root: str | None = None, device: str | None = None,
                     memory_limit: int | None = None) -> dict[str, Any]:
    """Erase a class (``label``) or a group (``group``, for datasets with groups), each
    optionally a seeded ``fraction`` of it, or the training positions listed in ``samples``
    from the checkpoint at ``path``; write ``out/model.safetensors`` (with the source's mask)
    and ``out/result.json``. Every input is checked, and the memory the Fisher needs, before
    anything is written."""
    from prunescope import commands, devices, stages

    if sum(x is not None for x in (label, samples, group)) != 1:
        raise ConfigError("name the erasure set with exactly one of --class, --group or "
                          "--samples")
    if not spec.epsilon > 0 or not spec.dampening > 0 or spec.fisher_samples < 1:
        raise ConfigError("--epsilon and --dampening must be > 0 and --fisher-samples >= 1")
    model, mask, meta, splits = commands.load_checkpoint(path, data_root)
    chosen, selection, unseen_group = _erasure_set(splits, label, samples, group, fraction,
                                                   spec.seed)
    if len(chosen) >= len(splits.train):
        raise ConfigError("the erasure set is the whole training split; retrain instead")
    check_fits(model, trainable(model), spec.block_size, memory_limit)
    key = {"source": stages.source_key(path), "selection": selection,
           "positions_sha256": hashlib.sha256(chosen.numpy().tobytes()).hexdigest(),
           "spec": spec.__dict__, "data_root": data_root}
    model.to(devices.resolve(device))

    def compute() -> list[dict[str, Any]]:
        return [_erase_and_report(model, mask, meta, splits, chosen, out, spec, memory_limit,
                                  {"checkpoint": str(path), **selection}, unseen_group)]

    return stages.run([out], key, compute)[0]


def _erasure_set(splits, label, samples, group, fraction: float, seed: int
                 ) -> tuple[torch.Tensor, dict[str, Any], int | None]:
    """The erased training positions, the selection as recorded, and the group index when a
    group is erased (its test samples are then the unseen ones)."""
    if label is not None:
        return (class_positions(splits.train, parse_class(label, splits.classes),
                                splits.classes, fraction=fraction, seed=seed),
                {"class": label, "fraction": fraction}, None)
    if group is not None:
        index = parse_group(group, splits.group_names)
        return (group_positions(splits.train, index, splits.group_names, fraction=fraction,
                                seed=seed),
                {"group": splits.group_names[index], "fraction": fraction}, index)
    return read_positions(samples, len(splits.train)), {"samples": str(samples)}, None


def _erase_and_report(model, mask, meta, splits, chosen, out, spec, memory_limit, fields,
                      group=None):
    """The erasure, its measurements before and after, and the erased checkpoint."""
    from prunescope import checkpoint

    erased_set, retained, unseen = _subsets(splits, chosen, group)
    before = measure(model, erased_set, retained, unseen, splits.test)
    start = time.perf_counter()
    held = mask if mask.sparsity > 0 else None
    inverse = InverseFisher.build(model, splits.train, mask=held, block_size=spec.block_size,
                                  dampening=spec.dampening, samples=spec.fisher_samples,
                                  seed=spec.seed, memory_limit=memory_limit)
    fisher_seconds = time.perf_counter() - start
    start = time.perf_counter()
    erase(model, erased_set, inverse, epsilon=spec.epsilon)
    erase_seconds = time.perf_counter() - start
    after = measure(model, erased_set, retained, unseen, splits.test)
    record = {"erased": len(chosen), "train_size": len(splits.train), **spec.__dict__,
              "fisher_gradients": inverse.samples}
    saved = {k: v for k, v in meta.items() if k in ("model", "data")}
    checkpoint.save(out / "model.safetensors", model, meta={**saved, "erasure": record},
                    mask=held)
    return {**fields, **record, "before": before, "after": after,
            "seconds": {"fisher": fisher_seconds, "erase": erase_seconds}}


def _subsets(splits, chosen: torch.Tensor, group: int | None = None
             ) -> tuple[Subset, Subset, Subset]:
    """The erased samples, the retained training samples and the unseen ones: the test
    samples of the erased group (``group``), else of the classes the erased set holds."""
    train = splits.train
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[chosen] = False
    erased_set = train.select(chosen)
    seen = (splits.test.groups == group if group is not None and splits.test.groups is not None
            else torch.isin(splits.test.y, erased_set.y.unique()))
    unseen = seen.nonzero().squeeze(1)
    return erased_set, train.select(rest.nonzero().squeeze(1)), splits.test.select(unseen)


def measure(model: nn.Module, erased_set: Subset, retained: Subset, unseen: Subset,
            test: Subset) -> dict[str, Any]:
    """Loss and accuracy on the erased, retained, unseen and test samples, and the
    membership-style loss gap ``loss(unseen) - loss(erased)`` (about 0 once the erased samples
    look unseen; positive while the model still fits them better)."""
    from prunescope.train import evaluate

    scores = {name: evaluate(model, part) for name, part in
              (("erased", erased_set), ("retained", retained), ("unseen", unseen),
               ("test", test))}
    return {**scores, "loss_gap": scores["unseen"]["loss"] - scores["erased"]["loss"]}

