"""Worst-class robust distillation: the loss and its gradient, the lambda update, a held mask,
resume, the run's wiring and bad input, each against a hand computation or a reference."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from pipeline_helpers import digits, lenet, state_equal
from torch import nn

from prunescope import checkpoint, models
from prunescope.distill import DistillConfig, distillation_loss
from prunescope.errors import ConfigError
from prunescope.robust_distill import LambdaHook, RobustDistillationLoss, eg_update, per_class_mean
from prunescope.run import Run
from prunescope.sparsifier import MaskHold, prune
from prunescope.train import FINAL, LAST, TrainConfig, _Loop, fit

# a batch of 5 examples over 4 classes; class 3 is absent
LOGITS = [[1.0, 0.5, -0.5, 0.0], [0.2, -1.0, 0.3, 0.8], [-0.3, 0.4, 1.5, 0.1],
          [0.0, 0.0, 0.0, 0.0], [2.0, -0.5, 0.1, -1.0]]
TEACHER = [[2.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.5], [0.0, 0.0, 3.0, 0.0],
           [1.0, -1.0, 0.5, 0.0], [0.5, 0.5, 0.0, 0.0]]
TARGETS = [0, 1, 2, 2, 0]
LAM = [0.4, 0.3, 0.2, 0.1]


def _softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _hand(blend: float, weight: float, temperature: float):
    """Loss and d loss / d logits written out from the definition, in plain Python."""
    counts = {y: TARGETS.count(y) for y in set(TARGETS)}
    n, loss, grads = len(TARGETS), 0.0, []
    for s, t, y in zip(LOGITS, TEACHER, TARGETS, strict=True):
        p, ps, q = _softmax(s), _softmax(s, temperature), _softmax(t, temperature)
        ce = -math.log(p[y])
        kl = sum(qc * (math.log(qc) - math.log(pc)) for qc, pc in zip(q, ps, strict=True))
        example = (1 - weight) * ce + weight * temperature ** 2 * kl
        w = (1 - blend) / n + blend * LAM[y] / counts[y]  # this example's share of the loss
        loss += w * example
        grads.append([w * ((1 - weight) * (p[c] - (c == y))
                           + weight * temperature * (ps[c] - q[c])) for c in range(4)])
    return loss, torch.tensor(grads, dtype=torch.float64)


def _loss(**options) -> RobustDistillationLoss:
    """A robust loss whose teacher returns its input: the inputs are the teacher's logits."""
    val = digits().val  # unused by __call__
    loss = RobustDistillationLoss(nn.Identity(), 4, val, **options)
    loss.lam = torch.tensor(LAM, dtype=torch.float64)
    return loss


@pytest.mark.parametrize(("blend", "weight", "temperature"),
                         [(1.0, 0.0, 1.0), (0.7, 0.4, 2.0), (0.3, 1.0, 4.0)])
def test_loss_and_gradient_match_hand_computation(blend, weight, temperature):
    loss_fn = _loss(blend=blend, weight=weight, temperature=temperature)
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    value = loss_fn(logits, torch.tensor(TARGETS), torch.tensor(TEACHER, dtype=torch.float64))
    value.backward()
    expected, grads = _hand(blend, weight, temperature)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(logits.grad.double(), grads, rtol=1e-5, atol=1e-7)


def test_blend_zero_is_hintons_distillation_loss():
    loss_fn = _loss(blend=0.0, weight=0.4, temperature=3.0)
    logits, teacher = torch.tensor(LOGITS), torch.tensor(TEACHER)
    targets = torch.tensor(TARGETS)
    torch.testing.assert_close(loss_fn(logits, targets, teacher),
                               distillation_loss(logits, teacher, targets, 3.0, 0.4))


def test_per_class_mean_leaves_absent_classes_at_zero():
    means, present = per_class_mean(torch.tensor([1.0, 2.0, 4.0, 8.0]),
                                    torch.tensor([0, 2, 2, 0]), 4)
    assert means.tolist() == [4.5, 0.0, 3.0, 0.0]
    assert present.tolist() == [True, False, True, False]


def test_eg_update_matches_hand_computation():
    lam = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    new = eg_update(lam, torch.tensor([1.0, 2.0, 9.0]), torch.tensor([True, True, False]), 0.5)
    raised = [0.5 * math.exp(0.5), 0.3 * math.exp(1.0), 0.2]  # absent class: factor 1
    assert new.tolist() == pytest.approx([r / sum(raised) for r in raised], rel=1e-12)


def test_update_uses_the_students_per_class_validation_loss():
    # the "student" returns its (flattened) input as logits; a 4-example validation split
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5], [1.0, 1.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0])
    val = dataclasses.replace(digits().val, x=x.view(4, 1, 1, 3), y=y,
                              index=torch.arange(4), groups=None)
    loss = RobustDistillationLoss(None, 3, val, weight=0.0, step_size=0.3, val_batch_size=4)
    loss.update(nn.Flatten())

    def ce(row, label):
        return -math.log(_softmax(row)[label])

    class_loss = [(ce([2, 0, 0], 0) + ce([1, 1, 0], 0)) / 2,
                  (ce([0, 1, 0], 1) + ce([0, 0, 0.5], 1)) / 2]
    raised = [math.exp(0.3 * class_loss[0]), math.exp(0.3 * class_loss[1]), 1.0]
    assert loss.lam.tolist() == pytest.approx([r / sum(raised) for r in raised], rel=1e-6)
    assert loss.updates == 1


def _robust(teacher: nn.Module | None = None, **options) -> RobustDistillationLoss:
    settings = {"weight": 0.0 if teacher is None else 0.5, "step_size": 0.5, "every": 3,
                "val_batch_size": 50, **options}
    return RobustDistillationLoss(teacher, 10, digits().val, **settings)


CONFIG = TrainConfig(epochs=3, batch_size=64, lr=0.05, weight_decay=1e-3)


def test_a_sparse_student_keeps_its_mask_and_lambda_moves(tmp_path):
    start = lenet()
    mask = prune(lenet(), "magnitude", "uniform", 0.8)
    loss = _robust(teacher=lenet(seed=5))
    fit(start, digits(), dataclasses.replace(CONFIG, epochs=1), tmp_path,
        hook=loss.hook(MaskHold(mask)), loss_fn=loss, progress=False)
    params = dict(start.named_parameters())
    for name, keep in mask.items():
        assert torch.count_nonzero(params[name][~keep]) == 0
    assert checkpoint.load(tmp_path / FINAL).mask.equal(mask)
    steps = math.ceil(len(digits().train) / 64)
    assert loss.updates == steps // 3
    assert loss.lam.sum().item() == pytest.approx(1.0)
    assert not torch.allclose(loss.lam, torch.full((10,), 0.1, dtype=torch.float64))


def test_resume_keeps_lambda(tmp_path, monkeypatch):
    mask = prune(lenet(), "magnitude", "uniform", 0.7)
    whole, whole_loss = lenet(), _robust()
    fit(whole, digits(), CONFIG, tmp_path / "a", hook=whole_loss.hook(MaskHold(mask)),
        loss_fn=whole_loss, progress=False)

    original = _Loop._save

    def save_then_die(self, path, *, with_state):
        original(self, path, with_state=with_state)
        if path.name == LAST and self.epoch == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(_Loop, "_save", save_then_die)
        cut = _robust()
        with pytest.raises(KeyboardInterrupt):
            fit(lenet(), digits(), CONFIG, tmp_path / "b", hook=cut.hook(MaskHold(mask)),
                loss_fn=cut, progress=False)
    saved = checkpoint.load(tmp_path / "b" / LAST).meta["hook"]["robust"]
    assert saved["lambda"] == cut.lam.tolist() and saved["updates"] == cut.updates > 0

    resumed, resumed_loss = lenet(), _robust()
    fit(resumed, digits(), CONFIG, tmp_path / "b", hook=resumed_loss.hook(MaskHold(mask)),
        loss_fn=resumed_loss, progress=False)
    assert torch.equal(resumed_loss.lam, whole_loss.lam)
    assert resumed_loss.updates == whole_loss.updates
    assert state_equal(resumed.state_dict(), whole.state_dict())


def test_every_zero_keeps_lambda_uniform_the_class_balanced_loss():
    loss = _robust(every=0)
    hook = loss.hook(None)
    hook.after_optimizer_step(lenet(), 2, None)
    assert loss.updates == 0
    logits, targets = torch.tensor(LOGITS[:4] * 3), torch.tensor([0, 1, 2, 2] * 3)
    logits = torch.cat([logits, torch.zeros(12, 6)], 1)
    per_example = nn.functional.cross_entropy(logits, targets, reduction="none")
    balanced = sum(per_example[targets == c].mean() for c in range(3)) / 10
    torch.testing.assert_close(loss(logits, targets, logits), balanced)


# -- through the Run ---------------------------------------------------------------------------


def _run(tmp_path, **distill) -> Run:
    config = DistillConfig(**{"teacher": "none", "robust": True, "weight": 0.0, **distill})
    return Run.from_dataset("digits", "lenet300", tmp_path, val_size=100,
                            train=dataclasses.replace(CONFIG, epochs=1), distill=config)


def test_run_builds_the_robust_loss_and_checkpoints_lambda(tmp_path):
    run = _run(tmp_path, every=2, val_batch_size=50)
    assert isinstance(run.loss_fn(), RobustDistillationLoss)
    run.fit(run.fresh_model(), tmp_path / "robust", run.train, desc="robust")
    state = checkpoint.load(tmp_path / "robust" / FINAL).meta["hook"]
    assert state["robust"]["updates"] == math.ceil(len(run.splits.train) / 64) // 2
    assert sum(state["robust"]["lambda"]) == pytest.approx(1.0)


def test_plain_distillation_keys_are_unchanged():
    assert DistillConfig(teacher="dense").key() == {"teacher": "dense", "temperature": 4.0,
                                                    "weight": 0.5}
    assert DistillConfig(teacher="dense", robust=True).key()["step_size"] == 0.1


def test_a_teacher_of_another_label_space_is_refused(tmp_path):
    teacher = models.build("lenet300", num_classes=3, in_channels=1, image_size=8)
    path = tmp_path / "teacher.safetensors"
    checkpoint.save(path, teacher, meta={"model": checkpoint.model_spec(teacher, 3)})
    run = _run(tmp_path / "run", teacher=str(path), weight=0.5)
    with pytest.raises(ConfigError, match="predicts 3 classes but the data has 10"):
        run.loss_fn()


@pytest.mark.parametrize(("options", "message"), [
    ({"step_size": 0.0}, "step_size"), ({"step_size": -1.0}, "step_size"),
    ({"step_size": math.nan}, "step_size"), ({"blend": 1.5}, "blend"),
    ({"blend": -0.1}, "blend"), ({"weight": 1.2}, "weight"), ({"every": -1}, "every"),
    ({"weight": 0.5}, "teacher: none"),
])
def test_bad_settings_are_one_line_config_errors(options, message):
    with pytest.raises(ConfigError, match=message) as error:
        DistillConfig(**{"teacher": "none", "robust": True, "weight": 0.0, **options})
    assert "\n" not in str(error.value)


def test_no_teacher_needs_the_robust_objective():
    with pytest.raises(ConfigError, match="robust: true"):
        DistillConfig(teacher="none")


def test_the_hook_delegates_the_mask(tmp_path):
    mask = prune(lenet(), "magnitude", "uniform", 0.5)
    inner = MaskHold(mask)
    hook = _robust().hook(inner)
    assert isinstance(hook, LambdaHook) and hook.mask is mask
    hook.mask = None
    assert inner.mask is None
