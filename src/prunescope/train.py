"""One readable training loop: fit, evaluate, checkpoint each epoch, resume.

:func:`fit` trains a model on a :class:`prunescope.data.Splits` with SGD (momentum, Nesterov) or
AdamW, a constant / step / cosine / one-cycle learning rate computed from the step (stateless),
label smoothing and weight decay, and an optional loss (e.g. distillation). A training hook
(:class:`prunescope.sparsifier.MaskHold`, :class:`~prunescope.sparsifier.ScheduledPruning`, or a
sparse-training method's) is called around every optimizer step; see
:class:`prunescope.hooks.Hook`. The model trains on its own device (or the one ``fit`` is given),
each batch moved there as it is used, optionally in mixed precision (:mod:`prunescope.devices`).
Under ``torchrun`` each process trains on its share of every global batch (see
:mod:`prunescope.distributed`). Every epoch ends with one log line (logger ``prunescope.train``)
that stays on screen after the progress bar, and optionally with a metrics logger's record
(:mod:`prunescope.logs`: TensorBoard).

Each epoch ends with an atomic checkpoint ``last.safetensors`` (weights, mask, optimizer, the
torch RNG and the shuffling generator) and a line in ``metrics.jsonl``. Calling :func:`fit` again
on the same directory resumes from the last checkpoint and ends with the same weights as an
uninterrupted run; a finished run is not trained again. The final weights are written to
``model.safetensors``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from prunescope import checkpoint, devices, distributed, losses
from prunescope.data import Loader, Splits, Subset, random_crop_flip
from prunescope.errors import ConfigError, TrainingError
from prunescope.files import append_jsonl, atomic_write_bytes, read_jsonl
from prunescope.hooks import Hook
from prunescope.keys import ADDED_LATER
from prunescope.logs import MetricsLogger

logger = logging.getLogger(__name__)

LAST, FINAL, METRICS = "last.safetensors", "model.safetensors", "metrics.jsonl"
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("constant", "step", "cosine", "onecycle", "linear")


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``milestones`` are epochs (for the step schedule); lr is the peak rate.
    ``sparse_kernels`` runs the layers of a fixed mask on :mod:`prunescope.kernels` where they are
    measured faster (fixed-mask fine-tuning only; see :mod:`prunescope.kernels.training`);
    ``precision`` is ``fp32``, ``bf16`` or ``fp16`` (mixed precision, :mod:`prunescope.devices`).
    ``warmup``: the fraction of the steps over which the rate rises linearly from 0 before the
    schedule (the ``linear`` schedule then decays linearly to 0: the transformer fine-tuning
    default, Devlin et al. 2019); ``max_grad_norm``: clip the global gradient norm to it
    (None: no clipping). ``loss``: ``cross_entropy``, or ``supcon``: cross-entropy plus
    ``supcon_weight`` times the supervised contrastive loss at ``temperature`` on the
    penultimate representation (:mod:`prunescope.losses`).
    """

    epochs: int = 8
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    label_smoothing: float = 0.0
    eval_batch_size: int = 1000
    sparse_kernels: bool = False
    precision: str = "fp32"
    warmup: float = 0.0
    max_grad_norm: float | None = None
    loss: str = field(default="cross_entropy", metadata=ADDED_LATER)
    temperature: float = field(default=losses.TEMPERATURE, metadata=ADDED_LATER)
    supcon_weight: float = field(default=1.0, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of: sgd, adamw")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"unknown lr_schedule {self.lr_schedule!r}; "
                f"choose one of: {', '.join(LR_SCHEDULES)}"
            )
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        devices.check_precision(self.precision)
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"train.lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError("train.weight_decay must be >= 0 and train.momentum in [0, 1)")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"train.warmup is a fraction of the steps in [0, 1), got "
                              f"{self.warmup}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"train.max_grad_norm must be positive (or left out), got "
                              f"{self.max_grad_norm}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(
                f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        losses.check(self.loss, self.temperature, self.supcon_weight)
        if self.loss != "cross_entropy" and self.sparse_kernels:
            raise ConfigError(f"train.loss {self.loss} reads the model's layers, which "
                              "sparse_kernels replaces; use one or the other")


def lr_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at optimizer ``step`` (0-based), a pure function of the step: the linear
    warm-up, then the schedule over the remaining steps (``step``: by epoch, as before)."""
    total = max(1, config.epochs * steps_per_epoch)
    warm = round(config.warmup * total)
    if step < warm:
        return config.lr * (step + 1) / warm
    t = (min(step, total) - warm) / max(1, total - warm)  # of the steps after the warm-up
    if config.lr_schedule == "linear":
        return config.lr * max(0.0, total - step) / max(1, total - warm)
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule == "step":
        epoch = step // steps_per_epoch
        return config.lr * config.gamma ** sum(epoch >= m for m in config.milestones)
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    # one-cycle (Smith & Topin 2019), PyTorch's defaults: 30% warm-up from lr/25, cosine to lr/1e4
    warm, low, final = 0.3, config.lr / 25.0, config.lr / 25.0 / 1e4
    if t < warm:
        return low + (config.lr - low) * 0.5 * (1.0 - math.cos(math.pi * t / warm))
    return final + (config.lr - final) * 0.5 * (1.0 + math.cos(math.pi * (t - warm) / (1 - warm)))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (with momentum / Nesterov) or AdamW over all parameters, in PyTorch's fused form
    (one kernel per step for all parameters) where every parameter is a CPU or CUDA float
    tensor, else the multi-tensor (``foreach``) form. On the CPU a small model's step is
    otherwise mostly Python overhead; both forms compute the same update."""
    params = list(model.parameters())
    flavour = ({"fused": True} if all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                       for p in params) else {"foreach": True})
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                 **flavour)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay,
        **flavour,
    )


@torch.no_grad()
def predict(model: nn.Module, subset: Subset, batch_size: int = 1000) -> torch.Tensor:
    """Logits of ``model`` (in eval mode, on its own device) on every example of ``subset``, in
    order, as a float32 CPU tensor."""
    was_training = model.training
    model.eval()
    device = devices.model_device(model)
    try:
        starts = range(0, len(subset), batch_size)
        return torch.cat([model(subset.x[i:i + batch_size].to(device)).float().cpu()
                          for i in starts])
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, subset: Subset, batch_size: int = 1000) -> dict[str, float]:
    """``{"loss", "accuracy"}`` of ``model`` on ``subset`` (NaN for an empty subset)."""
    if len(subset) == 0:
        return {"loss": math.nan, "accuracy": math.nan}
    logits = predict(model, subset, batch_size)
    return {
        "loss": F.cross_entropy(logits, subset.y).item(),
        "accuracy": (logits.argmax(1) == subset.y).double().mean().item(),
    }


def fit(model: nn.Module, splits: Splits, config: TrainConfig, run_dir: str | Path, *,
        hook: Hook | None = None, loss_fn: LossFn | None = None, seed: int = 0,
        meta: dict[str, Any] | None = None, progress: bool | None = None,
        desc: str = "train", device: str | torch.device | None = None,
        metrics_logger: MetricsLogger | None = None) -> dict[str, Any]:
    """Train ``model`` in place on ``splits.train``; returns the last epoch's metrics record,
    with ``resumed_seconds``: the training seconds of the epochs an earlier call trained.

    Resumes from ``run_dir/last.safetensors`` when present. ``hook`` (a
    :class:`~prunescope.hooks.Hook`) keeps or changes the mask. ``loss_fn(logits, targets,
    inputs)`` replaces the default cross-entropy (with the config's label smoothing; the
    config's SupCon term, if any, is added to either). ``meta``
    (e.g. the model spec and dataset) is stored in every checkpoint. ``device`` moves the model
    there first (default: where it is). A model still carrying ``torch.nn.utils.prune``'s
    reparametrization is made plain first and, without a hook, its mask is held. Raises
    TrainingError when the loss is not finite.
    """
    from prunescope.interop import fold_torch_prune

    run_dir = Path(run_dir)
    if hook is not None and not isinstance(hook, Hook):
        raise TypeError(f"hook must be a prunescope.hooks.Hook, got {type(hook).__name__}")
    folded = fold_torch_prune(model)
    if folded is not None and hook is None:
        from prunescope.sparsifier import MaskHold

        hook = MaskHold(folded)
    if device is not None:
        model.to(devices.resolve(device))
    devices.check_precision(config.precision, devices.model_device(model))
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.sparse_kernels:
        from prunescope.kernels.training import sparse_layers

        example = splits.train.x[:config.batch_size]
        with sparse_layers(model, hook, example, run_dir,
                           resuming=(run_dir / LAST).exists()) as held:
            return _train(model, splits, config, run_dir, held, seed, meta, loss_fn, progress,
                          desc, metrics_logger)
    return _train(model, splits, config, run_dir, hook, seed, meta, loss_fn, progress, desc,
                  metrics_logger)


def _train(model, splits, config, run_dir, hook, seed, meta, loss_fn, progress, desc,
           metrics_logger) -> dict[str, Any]:
    loop = _Loop(model, splits, config, run_dir, hook or Hook(), seed, meta or {}, loss_fn)
    loop.resume()
    with losses.training_loss(model, config, loop.loss_fn) as loop.loss_fn:
        for epoch in range(loop.epoch, config.epochs):
            loop.train_epoch(epoch, progress, desc)
            if metrics_logger is not None:
                metrics_logger.log_epoch(desc, loop.last, model, loop.hook.mask)
    return loop.finish()


class _Loop:
    """The state of one fit() call: model, optimizer, generators, step and epoch counters."""

    def __init__(self, model, splits, config, run_dir, hook, seed, meta, loss_fn) -> None:
        self.model, self.splits, self.config, self.run_dir = model, splits, config, run_dir
        self.hook, self.meta = hook, meta
        self.loss_fn = loss_fn or self._cross_entropy
        self.device = devices.model_device(model)
        self.autocast = lambda: devices.autocast(self.device, config.precision)
        self.scaler = devices.grad_scaler(self.device, config.precision)
        self.resumed_seconds = 0.0
        self.optimizer = make_optimizer(model, config)
        self.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        augment = random_crop_flip if splits.augment == "crop_flip" else None
        self.loader = Loader(splits.train, config.batch_size, shuffle=True,
                             generator=self.generator, augment=augment)
        if len(self.loader) == 0:
            raise ConfigError("the training set is empty; check the dataset and val_size")
        self.epoch, self.step, self.last = 0, 0, None
        hook.hold_(model)

    def resume(self) -> None:
        path = self.run_dir / LAST
        if not path.exists():
            (self.run_dir / METRICS).unlink(missing_ok=True)
            return
        state = checkpoint.load(path)
        checkpoint.load_model_state(self.model, state.model, path)
        if state.optimizer is not None:
            self.optimizer.load_state_dict(state.optimizer)
        torch.set_rng_state(state.rng["torch"])
        self.generator.set_state(state.rng["loader"])
        self.hook.mask = state.mask
        self.hook.load_state_dict(state.meta.get("hook", {}))
        self.hook.hold_(self.model)
        self.epoch, self.step = state.meta["epoch"], state.meta["step"]
        self.last = state.meta.get("metrics")
        records = [r for r in read_jsonl(self.run_dir / METRICS) if r["epoch"] < self.epoch]
        self.resumed_seconds = sum(r.get("seconds", 0.0) for r in records)
        atomic_write_bytes(self.run_dir / METRICS,
                           "".join(json.dumps(r) + "\n" for r in records).encode())

    def train_epoch(self, epoch: int, progress: bool | None, desc: str) -> None:
        self.model.train()
        start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        bar = tqdm(self.loader, desc=f"{desc} {epoch + 1}/{self.config.epochs}", leave=False,
                   disable=_quiet(progress), file=sys.stderr, dynamic_ncols=True)
        for inputs, targets in bar:
            loss, hits, count = self._step(inputs, targets, epoch)
            loss_sum += loss * count
            correct += hits
            seen += count
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}",
                            refresh=False)
        loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen])
        record = {"epoch": epoch, "step": self.step, "lr": self._lr(self.step - 1),
                  "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                  **{f"val_{k}": v for k, v in evaluate(self.model, self.splits.val,
                                                        self.config.eval_batch_size).items()},
                  "sparsity": self.hook.mask.sparsity if self.hook.mask is not None else 0.0,
                  "seconds": time.perf_counter() - start}
        self.epoch, self.last = epoch + 1, record
        # the line first: a run killed between the two redoes this epoch and drops the line
        append_jsonl(self.run_dir / METRICS, record)
        self._save(self.run_dir / LAST, with_state=True)
        distributed.barrier()
        if distributed.is_writer():
            logger.info("%s epoch %d/%d: loss %.4f, train acc %.4f, val acc %.4f (%.1f s)", desc,
                        epoch + 1, self.config.epochs, record["train_loss"],
                        record["train_accuracy"], record["val_accuracy"], record["seconds"])

    def _step(self, inputs: torch.Tensor, targets: torch.Tensor, epoch: int
              ) -> tuple[float, int, int]:
        """One optimizer step on a global batch; returns this process's (loss, hits, count)."""
        self.hook.on_step(self.model, self.step, self.optimizer)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(self.step)
        local_inputs, local_targets = distributed.shard(inputs, targets)
        share = len(local_targets) / len(targets)
        local_inputs, local_targets = devices.batch_to(self.device, local_inputs, local_targets)
        scaler = self.scaler

        def closure() -> tuple[torch.Tensor, torch.Tensor]:
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                logits = self.model(local_inputs)
                loss = self.loss_fn(logits, local_targets, local_inputs)
            self._check_finite(loss, epoch)
            scaled = loss * share  # summed over processes: the global batch's gradient
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            distributed.all_reduce_gradients(self.model)
            return loss.detach(), logits.detach()

        loss, logits = closure()
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # hooks see (and mask) the true gradients
        update = self.hook.before_optimizer_step(self.model, self.step, self.optimizer,
                                                 closure) is not False
        if update and self.config.max_grad_norm is not None:  # the hook has masked them
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        if scaler is not None:
            if update:
                scaler.step(self.optimizer)
            scaler.update()
        elif update:
            self.optimizer.step()
        self.hook.after_optimizer_step(self.model, self.step, self.optimizer)
        self.step += 1
        hits = int((logits.argmax(1) == local_targets).sum())
        return loss.item(), hits, len(local_targets)

    def _cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor,
                       inputs: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, label_smoothing=self.config.label_smoothing)

    def _check_finite(self, loss: torch.Tensor, epoch: int) -> None:
        value = loss.item()
        if math.isfinite(value):
            return
        kept = (f"; the last good checkpoint is kept in {self.run_dir}"
                if (self.run_dir / LAST).exists() else "")
        raise TrainingError(
            f"the loss became {value} at epoch {epoch + 1}, step {self.step}; lower the "
            f"learning rate (now {self._lr(self.step):g}) or check the data{kept}"
        )

    def finish(self) -> dict[str, Any]:
        self._save(self.run_dir / FINAL, with_state=False)
        return {**(self.last or {}), "resumed_seconds": self.resumed_seconds}

    def _lr(self, step: int) -> float:
        return lr_at(self.config, max(step, 0), len(self.loader))

    def _save(self, path: Path, *, with_state: bool) -> None:
        meta = {**self.meta, "epoch": self.epoch, "step": self.step, "metrics": self.last,
                "train": asdict(self.config)}
        meta["hook"] = self.hook.state_dict()
        rng = {"torch": torch.get_rng_state(), "loader": self.generator.get_state()}
        checkpoint.save(path, self.model, meta=meta, mask=self.hook.mask,
                        optimizer=self.optimizer if with_state else None,
                        rng=rng if with_state else None)


def _quiet(progress: bool | None) -> bool:
    """Progress bars on a terminal (or when asked) and on rank 0 only."""
    if not distributed.is_writer():
        return True
    return not (sys.stderr.isatty() if progress is None else progress)
