"""SSSE erasure: the step against a direct dense-inverse computation, masks, bad input, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunescope import checkpoint, cli, data
from prunescope.data.base import Subset
from prunescope.erasure import (
    DAMPENING,
    EraseSpec,
    InverseFisher,
    class_positions,
    erase,
    group_positions,
    parse_group,
    read_positions,
)
from prunescope.errors import ConfigError, DataError, PruningError
from prunescope.mask import Mask
from prunescope.train import TrainConfig, fit


def _data(n: int, classes: int, seed: int = 0) -> Subset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 2, 2, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return Subset(x, y, torch.arange(n))


def _gradients(model: nn.Module, subset: Subset) -> torch.Tensor:
    """Per-example gradients of all parameters, flattened in model order, float64: one plain
    autograd call per example (independent of the vmap path under test)."""
    rows = []
    for i in range(len(subset)):
        loss = F.cross_entropy(model(subset.x[i:i + 1]), subset.y[i:i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(rows)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


def _reference_step(model, train, erased, epsilon, dampening, *, structure=None, keep=None):
    """``eps/(n-k) (F + lambda I)^-1 sum_S g`` with a dense inverse of the full matrix;
    ``structure`` (bool [d, d]) zeroes the entries outside the Fisher blocks, ``keep`` (bool
    [d]) drops pruned coordinates (their rows and columns) before inverting."""
    g = _gradients(model, train)
    d = g.shape[1]
    keep = torch.ones(d, dtype=torch.bool) if keep is None else keep
    g = g * keep
    fisher = g.T @ g / len(train)
    if structure is not None:
        fisher = fisher * structure
    lam = dampening * fisher.diagonal().mean()
    kept = keep.nonzero().squeeze(1)
    system = fisher[kept][:, kept] + lam * torch.eye(len(kept), dtype=torch.float64)
    total = (_gradients(model, erased) * keep).sum(0)
    step = torch.zeros(d, dtype=torch.float64)
    step[kept] = torch.linalg.solve(system, total[kept])
    return epsilon / (len(train) - len(erased)) * step


def test_step_equals_the_dense_inverse_with_one_block_for_the_whole_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False))
    train = _data(20, 3)
    erased = train.select(torch.tensor([2, 5, 11]))
    expected = _reference_step(model, train, erased, 0.7, DAMPENING)
    before = _flat(model)
    inverse = InverseFisher.build(model, train, block_size=12, samples=20)
    assert inverse.inverses["1.weight"].shape == (1, 12, 12)
    erase(model, erased, inverse, epsilon=0.7)
    assert torch.allclose(_flat(model) - before, expected, rtol=1e-4, atol=1e-7)
    assert expected.abs().max() > 1e-3  # a real move, not a vanishing one


def test_step_uses_the_block_diagonal_of_the_fisher_over_every_tensor():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    train = _data(30, 2, seed=3)
    erased = train.select(torch.tensor([0, 7]))
    # block cap 3: weight 12 -> 4 blocks of 3, bias 3 -> 1, weight 6 -> 2, bias 2 -> 1 of 2
    sizes = [3] * 4 + [3] + [3] * 2 + [2]
    structure = torch.block_diag(*[torch.ones(s, s) for s in sizes]).bool()
    expected = _reference_step(model, train, erased, 1.0, 0.05, structure=structure)
    before = _flat(model)
    erase(model, erased, InverseFisher.build(model, train, block_size=3, dampening=0.05,
                                             samples=30), epsilon=1.0)
    assert torch.allclose(_flat(model) - before, expected, rtol=1e-4, atol=1e-7)
    dense = _reference_step(model, train, erased, 1.0, 0.05)
    assert not torch.allclose(dense, expected, rtol=1e-2)  # the block structure matters


def test_a_mask_keeps_pruned_weights_exactly_zero_and_solves_on_the_kept_ones():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False))
    keep = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 1], [1, 1, 0, 1]], dtype=torch.bool)
    mask = Mask({"1.weight": keep})
    mask.apply_(model)
    train = _data(25, 3, seed=4)
    erased = train.select(torch.tensor([1, 4, 9, 16]))
    dense_move = _reference_step(model, train, erased, 1.0, DAMPENING)
    assert dense_move[~keep.reshape(-1)].abs().min() > 0  # without the mask they would move
    expected = _reference_step(model, train, erased, 1.0, DAMPENING, keep=keep.reshape(-1))
    before = _flat(model)
    erase(model, erased, InverseFisher.build(model, train, mask=mask, block_size=12,
                                             samples=25), epsilon=1.0)
    weight = model[1].weight.detach()
    assert torch.equal(weight[~keep], torch.zeros(int((~keep).sum())))
    assert torch.allclose(_flat(model) - before, expected, rtol=1e-4, atol=1e-7)


def test_erase_refuses_an_empty_set_and_erasing_everything():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    train = _data(10, 3)
    inverse = InverseFisher.build(model, train, samples=10)
    with pytest.raises(ConfigError, match="empty"):
        erase(model, train.select(torch.tensor([], dtype=torch.int64)), inverse)
    with pytest.raises(ConfigError, match="fewer than all"):
        erase(model, train, inverse)


def test_a_fisher_too_large_for_memory_is_refused_with_the_size_needed():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(PruningError, match=r"erasure's Fisher .* needs .* GiB"):
        InverseFisher.build(model, _data(10, 3), memory_limit=1000)


def test_erasure_sets_from_a_class_and_from_a_file(tmp_path):
    train = _data(40, 3)
    classes = ("a", "b", "c")
    chosen = class_positions(train, 1, classes, fraction=0.5, seed=0)
    members = (train.y == 1).nonzero().squeeze(1)
    assert len(chosen) == round(0.5 * len(members)) and set(chosen.tolist()) <= set(
        members.tolist())
    with pytest.raises(ConfigError, match="label space"):
        class_positions(train, 3, classes)
    (tmp_path / "ok.txt").write_text("3, 1\n7\n")
    assert read_positions(tmp_path / "ok.txt", 40).tolist() == [1, 3, 7]
    (tmp_path / "ok.json").write_text("[5, 2]")
    assert read_positions(tmp_path / "ok.json", 40).tolist() == [2, 5]
    for text, error, word in (("", ConfigError, "empty"), ("1 40", ConfigError, "40"),
                              ("2 2", ConfigError, "twice"), ("1 x", DataError, "integer")):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(error, match=word):
            read_positions(tmp_path / "bad.txt", 40)


def test_erasure_sets_from_a_group():
    train = _data(40, 3)
    groups = torch.tensor([0, 1, 1, 0] * 10)  # group 1: positions 1, 2, 5, 6, ...
    grouped = Subset(train.x, train.y, train.index, groups)
    names = ("even", "odd", "none")
    chosen = group_positions(grouped, 1, names, fraction=0.25, seed=3)
    members = [i for i in range(40) if i % 4 in (1, 2)]
    assert len(chosen) == 5 and set(chosen.tolist()) <= set(members)  # round(0.25 * 20)
    assert chosen.tolist() == sorted(chosen.tolist())
    assert chosen.tolist() == group_positions(grouped, 1, names, fraction=0.25,
                                              seed=3).tolist()
    assert group_positions(grouped, 0, names).tolist() == [i for i in range(40)
                                                           if i % 4 in (0, 3)]
    assert len(group_positions(grouped, 1, names, fraction=0.01)) == 1  # at least one
    assert (parse_group("odd", names), parse_group("2", names), parse_group(0, names)) == (1, 2, 0)
    for call, word in ((lambda: group_positions(grouped, 3, names), "0..2"),
                       (lambda: group_positions(grouped, 2, names), "'none' has no training"),
                       (lambda: group_positions(train, 0, names), "no groups"),
                       (lambda: group_positions(grouped, 1, names, fraction=1.5), "fraction"),
                       (lambda: parse_group("blue", names), "even, odd, none"),
                       (lambda: parse_group("0", ()), "no groups")):
        with pytest.raises(ConfigError, match=word):
            call()


# -- prunescope erase ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """LeNet-300-100 on 8x8 digits, 2 epochs; and a copy pruned to 70% by magnitude."""
    from prunescope import models
    from prunescope.sparsifier import prune

    root = tmp_path_factory.mktemp("erase")
    splits = data.load("digits")
    torch.manual_seed(0)
    model = models.build("lenet300", num_classes=10, in_channels=1, image_size=8)
    meta = {"model": checkpoint.model_spec(model, 10),
            "data": {"name": "digits", "root": None, "val_size": None, "seed": 0}}
    fit(model, splits, TrainConfig(epochs=2, lr=0.05), root / "dense", meta=meta,
        progress=False)
    mask = prune(model, "magnitude", "global", 0.7)
    checkpoint.save(root / "sparse.safetensors", model, meta=meta, mask=mask)
    return {"dense": root / "dense" / "model.safetensors", "sparse": root / "sparse.safetensors"}


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["erase", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_erase_command_writes_the_erased_sparse_model_and_its_result(trained, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _cli(capsys, "--checkpoint", trained["sparse"], "--class", "3",
                             "--fraction", "0.5", "--out", out)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    assert json.loads(stdout) == result
    train = data.load("digits").train
    assert result["erased"] == round(0.5 * int((train.y == 3).sum()))
    for when in ("before", "after"):
        for part in ("erased", "retained", "unseen", "test"):
            assert 0 <= result[when][part]["accuracy"] <= 1
        gap = result[when]["unseen"]["loss"] - result[when]["erased"]["loss"]
        assert result[when]["loss_gap"] == pytest.approx(gap)
    assert result["after"]["erased"]["loss"] > result["before"]["erased"]["loss"]
    source, erased = checkpoint.load(trained["sparse"]), checkpoint.load(out / "model.safetensors")
    assert erased.mask is not None and erased.mask.equal(source.mask)
    for name, keep in source.mask.items():
        assert torch.equal(erased.model[name][~keep], torch.zeros(int((~keep).sum())))
        assert not torch.equal(erased.model[name], source.model[name])
    assert erased.meta["erasure"]["erased"] == result["erased"]


def test_erase_command_refuses_bad_input_and_writes_nothing(trained, tmp_path, capsys,
                                                          monkeypatch):
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "far.txt").write_text("0 99999\n")
    cases = [(("--class", "12"), "label space"),
             (("--class", "seven"), "label space"),
             (("--samples", tmp_path / "empty.txt"), "empty"),
             (("--samples", tmp_path / "far.txt"), "99999"),
             (("--class", "1", "--fraction", "0"), "fraction")]
    for options, word in cases:
        code, stdout, err = _cli(capsys, "--checkpoint", trained["dense"], "--out", out,
                                 *options)
        assert code == 2 and stdout == "" and word in err, (options, err)
        assert len(err.strip().splitlines()) == 1 and not out.exists()
    monkeypatch.setattr("prunescope.second_order.fisher.available_memory", lambda: 1 << 20)
    code, _, err = _cli(capsys, "--checkpoint", trained["dense"], "--class", "1", "--out", out)
    assert code == 2 and "GiB" in err and not out.exists()


def test_erase_help_explains_every_option_and_its_default():
    parser = next(a for a in cli._build_parser()._actions if a.dest == "command").choices["erase"]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            shown = formatter._expand_help(action)
            assert action.required or "default" in shown, (action.option_strings, shown)


def test_cli_defaults_are_the_erase_spec_defaults():
    parser = cli._build_parser()
    args = parser.parse_args(["erase", "--checkpoint", "x", "--class", "1", "--out", "o"])
    spec = EraseSpec()
    assert (args.epsilon, args.dampening, args.block_size, args.fisher_samples, args.seed) == (
        spec.epsilon, spec.dampening, spec.block_size, spec.fisher_samples, spec.seed)


DIGIT_GROUPS = ("low", "middle", "high", "empty")  # digits 0-3, 4-7, 8-9; "empty" has none


def _attach_groups(monkeypatch):
    """Make ``prunescope erase`` see digits with groups, digit // 4 (as mnist_lt's tiers);
    returns the patched loader."""
    from prunescope import commands
    from prunescope.data.base import Splits

    load = commands.load_checkpoint

    def with_groups(path, data_root=None):
        model, mask, meta, splits = load(path, data_root)
        parts = {name: getattr(splits, name) for name in ("train", "val", "test")}
        grouped = {name: Subset(p.x, p.y, p.index, p.y // 4) for name, p in parts.items()}
        return model, mask, meta, Splits(
            name=splits.name, **grouped, num_classes=splits.num_classes,
            input_shape=splits.input_shape, classes=splits.classes, mean=splits.mean,
            std=splits.std, group_names=DIGIT_GROUPS)

    monkeypatch.setattr(commands, "load_checkpoint", with_groups)
    return with_groups


@pytest.fixture()
def grouped_digits(monkeypatch):
    return _attach_groups(monkeypatch)


def test_erase_command_erases_a_group(trained, tmp_path, capsys, grouped_digits):
    from prunescope.train import evaluate

    out = tmp_path / "out"
    code, stdout, err = _cli(capsys, "--checkpoint", trained["sparse"], "--group", "middle",
                             "--fraction", "0.2", "--fisher-samples", "64", "--out", out)
    assert code == 0, err
    result = json.loads(stdout)
    assert (result["group"], result["fraction"]) == ("middle", 0.2)
    model, _, _, splits = grouped_digits(trained["sparse"])
    middle = int(((splits.train.y >= 4) & (splits.train.y <= 7)).sum())
    assert result["erased"] == round(0.2 * middle)
    unseen = splits.test.select((splits.test.groups == 1).nonzero().squeeze(1))
    assert result["before"]["unseen"] == pytest.approx(evaluate(model, unseen))
    assert result["after"]["erased"]["loss"] > result["before"]["erased"]["loss"]
    erased = checkpoint.load(out / "model.safetensors")
    assert erased.meta["erasure"]["erased"] == result["erased"]
    code, again, _ = _cli(capsys, "--checkpoint", trained["sparse"], "--group", "1",
                          "--fraction", "0.2", "--fisher-samples", "64", "--out", out)
    assert code == 0 and json.loads(again) == result  # the same group by index: read back


def test_erase_by_group_refuses_bad_input_and_writes_nothing(trained, tmp_path, capsys,
                                                             monkeypatch):
    out = tmp_path / "out"
    code, stdout, err = _cli(capsys, "--checkpoint", trained["dense"], "--group", "0",
                             "--out", out)  # plain digits: no groups
    assert code == 2 and stdout == "" and "no groups" in err and not out.exists()
    _attach_groups(monkeypatch)
    for group, word in (("7", "0..3"), ("tail", "low, middle, high, empty"),
                        ("empty", "no training sample")):
        code, stdout, err = _cli(capsys, "--checkpoint", trained["dense"], "--group", group,
                                 "--out", out)
        assert code == 2 and stdout == "" and word in err, (group, err)
        assert len(err.strip().splitlines()) == 1 and not out.exists()
