"""Sparse-training methods: schedules, invariants, and hand-computed updates (issue 3)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from pipeline_helpers import digits, recipe_dict
from torch import nn

from prunescope import recipe
from prunescope.bn import recalibrate_bn
from prunescope.distill import distillation_loss, load_teacher
from prunescope.errors import ConfigError
from prunescope.experiment import dense_stage, run_for
from prunescope.hooks import Hook
from prunescope.mask import Mask
from prunescope.methods.acdc import ACDCHook, reset_optimizer_state
from prunescope.methods.cram import CrAMHook
from prunescope.methods.lottery import keep_counts, scale_for
from prunescope.methods.rigl import DropGrowHook
from prunescope.run import Run
from prunescope.schedules import DropGrow, Phases
from prunescope.sparsifier import MaskHold, prune
from prunescope.train import TrainConfig, fit


def tiny_run(tmp_path, methods, *, epochs=2, sparsities=(0.9,)):
    """The run of a tiny recipe with ``methods`` and its first method."""
    raw = recipe_dict(prune={"methods": methods, "sparsities": list(sparsities)},
                      train={"epochs": epochs, "batch_size": 64, "lr": 0.05}, finetune=None)
    loaded = recipe.from_dict(raw)
    return run_for(loaded, tmp_path, progress=False, splits=digits()), loaded.prune.methods[0]


class Recorder(Hook):
    """Wraps a hook and records (step, nonzero target weights, mask sparsity) after each step."""

    def __init__(self, hook, names):
        self.hook, self.names, self.trace = hook, names, []

    @property
    def mask(self):
        return self.hook.mask

    @mask.setter
    def mask(self, value):
        self.hook.mask = value

    def hold_(self, model):
        self.hook.hold_(model)

    def on_step(self, model, step, optimizer=None):
        self.hook.on_step(model, step, optimizer)

    def before_optimizer_step(self, model, step, optimizer=None, closure=None):
        return self.hook.before_optimizer_step(model, step, optimizer, closure)

    def after_optimizer_step(self, model, step, optimizer=None):
        self.hook.after_optimizer_step(model, step, optimizer)
        params = dict(model.named_parameters())
        nonzero = sum(int(params[n].count_nonzero()) for n in self.names)
        self.trace.append((step, nonzero, None if self.mask is None else self.mask.sparsity))


# -- AC/DC -------------------------------------------------------------------------------------

def test_acdc_phases_by_hand():
    phases = Phases(warmup=2, compressed=3, decompressed=2, final=4, total=15)
    compressed = [phases.is_compressed(t) for t in range(15)]
    # warm-up 0-1, C 2-4, then D 5-10: a second cycle (C 7-9, D 10) does not fit whole before
    # the final C 11-14, so the last decompressed phase stretches to it
    assert compressed == [False, False, True, True, True, False, False, False, False, False,
                          False, True, True, True, True]
    assert [t for t in range(15) if phases.starts_compression(t)] == [2, 11]
    assert [t for t in range(15) if phases.starts_phase(t)] == [2, 5, 11]


def test_acdc_default_phases_are_the_authors_imagenet_schedule():
    # issue 15: 100 epochs, 10 warm-up, 5-epoch phases, final 15: the authors' last dense phase
    # is epochs 75-85 and the final compression starts at 85 (the old defaults compressed from 80)
    phases = Phases(warmup=10, compressed=5, decompressed=5, final=15, total=100)
    starts = [t for t in range(100) if phases.starts_compression(t)]
    assert starts == [10, 20, 30, 40, 50, 60, 70, 85]
    assert not any(phases.is_compressed(t) for t in range(75, 85))
    assert all(phases.is_compressed(t) for t in range(85, 100))
    assert phases.sparsity_at(12) == 0.0 and Phases(10, 5, 5, 15, 100, 0.9).sparsity_at(12) == 0.9


@pytest.mark.parametrize("reset, expected", [("never", []), ("every_phase", [2, 5, 11]),
                                             ("after_decompression", [11])])
def test_acdc_momentum_resets(reset, expected):
    phases = Phases(warmup=2, compressed=3, decompressed=2, final=4, total=15)
    hook = ACDCHook(phases, 0.5, "global", reset_momentum=reset, on_dense=lambda m, t: None,
                    prune_options={})
    assert [t for t in range(15) if hook._resets_at(t)] == expected


def test_acdc_refuses_an_unknown_momentum_reset(tmp_path):
    with pytest.raises(ConfigError, match="reset_momentum"):
        tiny_run(tmp_path, [{"method": "acdc", "reset_momentum": "sometimes"}])


@pytest.mark.parametrize("lengths", [dict(warmup=10, final=10), dict(warmup=0, compressed=0)])
def test_acdc_phases_that_do_not_fit_are_refused(lengths):
    args = dict(warmup=2, compressed=2, decompressed=2, final=4, total=15) | lengths
    with pytest.raises(ConfigError):
        Phases(**args)


def test_acdc_holds_the_exact_sparsity_in_compressed_phases_only(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    names = ["1.weight", "3.weight"]
    total = sum(model.get_parameter(n).numel() for n in names)
    steps = 2 * math.ceil(len(digits().train) / 64)
    phases = Phases(warmup=5, compressed=6, decompressed=6, final=10, total=steps)
    dense_ends = []
    hook = Recorder(ACDCHook(phases, 0.8, "global", reset_momentum="never",
                             on_dense=lambda m, t: dense_ends.append(t), prune_options={}),
                    names)
    fit(model, digits(), TrainConfig(epochs=2, batch_size=64, lr=0.05), tmp_path, hook=hook,
        progress=False)
    for step, nonzero, _ in hook.trace:
        if phases.is_compressed(step):
            assert nonzero == round(0.2 * total), step
        elif step > phases.warmup + 1:
            assert nonzero > round(0.2 * total), step  # decompressed: pruned weights regrow
    assert dense_ends == [t for t in range(steps) if phases.starts_compression(t)
                          and t > phases.warmup]


def test_momentum_reset_zeroes_every_buffer():
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    reset_optimizer_state(optimizer)
    assert all(torch.all(state["momentum_buffer"] == 0) for state in optimizer.state.values())


def test_acdc_yields_a_sparse_and_a_co_trained_dense_model(tmp_path):
    run, method = tiny_run(tmp_path, [{"method": "acdc", "warmup": 0.5, "compressed": 0.5,
                                       "decompressed": 0.5, "final": 1, "unit": "epochs"}],
                           epochs=3)
    (result,) = method.run_one(run, 0.9)
    assert result["actual_sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert 0 < result["dense_accuracy"] <= 1
    assert (tmp_path / "acdc" / "s0.9" / "dense.safetensors").is_file()


# -- GMP ---------------------------------------------------------------------------------------

def test_gmp_masks_only_shrink_and_reach_the_target(tmp_path):
    run, method = tiny_run(tmp_path, [{"method": "gmp", "start": 0.5, "end": 1.5, "every": 5,
                                       "unit": "epochs"}])
    (result,) = method.run_one(run, 0.9)
    assert result["actual_sparsity"] == pytest.approx(0.9, abs=1e-4)
    schedule = method.schedule(run, 0.9)
    values = [schedule.sparsity_at(t) for t in range(schedule.end + 2)]
    assert values == sorted(values) and values[-1] == 0.9


def test_gmp_schedule_past_the_training_is_refused(tmp_path):
    run, method = tiny_run(tmp_path, [{"method": "gmp", "start": 1, "end": 5, "unit": "epochs"}],
                           epochs=2)
    with pytest.raises(ConfigError, match="gmp.end"):
        method.check(run, (0.9,))


# -- RigL / SET --------------------------------------------------------------------------------

def test_drop_fraction_decays_by_cosine():
    schedule = DropGrow(every=10, end=100, alpha=0.3)
    assert schedule.fraction(0) == pytest.approx(0.3)
    assert schedule.fraction(50) == pytest.approx(0.15)
    assert schedule.fraction(100) == pytest.approx(0.0)
    assert [t for t in range(120) if schedule.is_update(t)] == list(range(10, 100, 10))


def rigl_setup(grow: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model.input_shape = (6,)
    mask = prune(model, "random", "uniform", 0.6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for _ in range(3):  # build up momentum
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        mask.mask_grads_(model)
        optimizer.step()
        mask.apply_(model)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    hook = DropGrowHook(mask, DropGrow(every=1, end=10, alpha=0.5), grow, seed=0)
    return model, mask, optimizer, hook


@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_rigl_keeps_counts_zeroes_grown_weights_and_resets_their_state(grow):
    model, old, optimizer, hook = rigl_setup(grow)
    grads = {n: model.get_parameter(n).grad.clone() for n in old}
    step_taken = hook.before_optimizer_step(model, 1, optimizer)
    assert step_taken is False  # no weight update on a rewiring step
    for name, keep in hook.mask.items():
        assert int(keep.sum()) == int(old[name].sum())  # each layer keeps its count
        param = model.get_parameter(name)
        grown = keep & ~old[name]
        assert grown.any()
        assert torch.all(param[grown] == 0) and torch.all(param[~keep] == 0)
        assert torch.all(optimizer.state[param]["momentum_buffer"][grown] == 0)
        if grow == "gradient":  # grown = the largest |grad| among the non-survivors
            moved = int(grown.sum())
            survivors = keep & ~grown
            candidates = grads[name].abs().masked_fill(survivors, -1)
            assert set(torch.topk(candidates.flatten(), moved).indices.tolist()) == set(
                grown.flatten().nonzero().flatten().tolist())


def test_rigl_update_period_zero_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="every"):
        tiny_run(tmp_path, [{"method": "rigl", "every": 0}])


def test_rigl_run_keeps_the_sparsity(tmp_path):
    run, method = tiny_run(tmp_path, [{"method": "set", "every": 5}])
    (result,) = method.run_one(run, 0.9)
    assert result["actual_sparsity"] == pytest.approx(0.9, abs=2e-3)


# -- lottery tickets ---------------------------------------------------------------------------

def test_lottery_rate_scaling_reaches_a_target_exactly():
    mask = Mask({"a": torch.ones(100, dtype=torch.bool), "b": torch.ones(50, dtype=torch.bool)})
    rates = {"a": 0.2, "b": 0.1}
    assert keep_counts(mask, rates, 1.0) == {"a": 80, "b": 45}
    scale = scale_for(mask, rates, 0.1)
    kept = sum(keep_counts(mask, rates, scale).values())
    assert 0 < scale < 1 and kept == 135  # 10% of 150 pruned


def test_lottery_rewinds_to_the_saved_weights_exactly(tmp_path, monkeypatch):
    run, method = tiny_run(tmp_path, [{"method": "lottery", "rate": 0.5, "control": False}],
                           epochs=1, sparsities=(0.7,))
    starts = []
    real_fit = Run.fit

    def capture(self, model, run_dir, config, **kwargs):
        starts.append((run_dir.name, copy.deepcopy(model.state_dict()), kwargs.get("hook")))
        return real_fit(self, model, run_dir, config, **kwargs)

    monkeypatch.setattr(Run, "fit", capture)
    results = method.run_one(run, 0.7)
    rewind = run.load(tmp_path / "lottery" / "rewind.safetensors").state_dict()
    init = run.fresh_model().state_dict()
    assert all(torch.equal(rewind[k], init[k]) for k in init)  # rewind point 0 = the init
    rounds = [(n, s, h) for n, s, h in starts if n.startswith("round") and n != "round00"]
    assert len(rounds) == 2  # 50%, then exactly 70%
    for _, state, hook in rounds:
        for key, value in state.items():
            keep = hook.mask[key] if key in hook.mask else torch.ones_like(value, dtype=bool)
            assert torch.equal(value, torch.where(keep, rewind[key], 0.0)), key
    assert rounds[1][2].mask.sparsity == pytest.approx(0.7, abs=1e-3)
    first, second = rounds[0][2].mask, rounds[1][2].mask
    assert all(torch.all(second[n] <= first[n]) for n in first)  # masks only shrink
    assert results[0]["sparsity"] == 0.7 and results[0]["rounds"] == 2
    assert [n for n, _, _ in rounds] == ["round01", "round02-s0.7"]  # the exact round is 0.7's


def test_lottery_adds_the_random_reinit_control(tmp_path):
    run, method = tiny_run(tmp_path, [{"method": "lottery", "rate": 0.6}], epochs=1,
                           sparsities=(0.6,))
    results = method.run_one(run, 0.6)
    assert [r["method"] for r in results] == ["lottery", "lottery-reinit"]
    assert results[0]["actual_sparsity"] == results[1]["actual_sparsity"]


# -- CrAM --------------------------------------------------------------------------------------

def test_cram_step_equals_the_hand_computed_two_step():
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    w = model.weight.detach().clone()

    def loss_at(weights):
        return ((x @ weights.T - y) ** 2).mean()

    def grad_at(weights):
        weights = weights.clone().requires_grad_(True)
        return torch.autograd.grad(loss_at(weights), weights)[0]

    rho = 0.1
    g = grad_at(w)
    perturbed = w + rho * g
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep.view(-1)[perturbed.abs().flatten().topk(2).indices] = True  # 50% by magnitude
    expected = grad_at(perturbed * keep) * keep + g  # CrAM+: masked compressed grad + dense grad

    def closure():
        model.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss, None

    closure()
    hook = CrAMHook((0.5,), rho, plus=True, sparse_grad=True, allocation="global",
                    pattern="unstructured", prune_options={}, seed=0)
    hook.before_optimizer_step(model, 0, None, closure)
    assert torch.equal(model.weight.detach(), w)  # the weights come back
    torch.testing.assert_close(model.weight.grad, expected, rtol=1e-6, atol=1e-7)


def test_cram_run_reports_cram_and_sgd_side_by_side(tmp_path):
    run, method = tiny_run(tmp_path, [{"method": "cram", "rho": 0.05}], epochs=1)
    dense_stage(run)
    results = method.run_one(run, 0.8)
    assert [r["method"] for r in results] == ["cram+", "sgd-one-shot"]
    for result in results:
        assert result["actual_sparsity"] == pytest.approx(0.8, abs=1e-4)
        assert 0 <= result["accuracy"] <= 1 and 0 <= result["dense_accuracy"] <= 1


# -- distillation and batch norm ----------------------------------------------------------------

def test_distillation_loss_by_hand():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0]])
    target = torch.tensor([1])
    temperature, weight = 2.0, 0.25
    p_t = torch.softmax(teacher / temperature, 1)
    log_p_s = torch.log_softmax(logits / temperature, 1)
    kl = (p_t * (p_t.log() - log_p_s)).sum()
    hard = -torch.log_softmax(logits, 1)[0, 1]
    expected = (1 - weight) * hard + weight * temperature ** 2 * kl
    got = distillation_loss(logits, teacher, target, temperature, weight)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(distillation_loss(logits, teacher, target, 3.0, 0.0),
                               F.cross_entropy(logits, target))


def test_a_teacher_for_other_classes_is_refused(tmp_path):
    from prunescope import checkpoint, models

    teacher = models.build("lenet300", num_classes=7, image_size=8)
    checkpoint.save(tmp_path / "t.safetensors", teacher,
                    meta={"model": checkpoint.model_spec(teacher, 7)})
    with pytest.raises(ConfigError, match="7 classes"):
        load_teacher(tmp_path / "t.safetensors", 10)


def test_bn_recalibration_gives_the_exact_average_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    batches = [(torch.randn(8, 3), None) for _ in range(3)]
    model.train()
    assert recalibrate_bn(model, batches) == 3
    with torch.no_grad():
        outputs = [model[0](x) for x, _ in batches]
    norm = model[1]
    torch.testing.assert_close(norm.running_mean, torch.stack([o.mean(0) for o in outputs])
                               .mean(0))
    torch.testing.assert_close(norm.running_var, torch.stack([o.var(0) for o in outputs])
                               .mean(0))
    assert model.training and norm.momentum == 0.1
    assert recalibrate_bn(nn.Linear(2, 2), batches) == 0


def test_mask_hold_alone_is_the_fixed_mask_fine_tuning(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    mask = prune(model, "magnitude", "global", 0.7, input_shape=(1, 8, 8))
    fit(model, digits(), TrainConfig(epochs=1, batch_size=64), tmp_path, hook=MaskHold(mask),
        progress=False)
    assert Mask.from_weights(model, list(mask)).sparsity >= 0.7 - 1e-9
