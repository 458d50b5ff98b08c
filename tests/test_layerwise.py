"""Tests of prunescope.layerwise: block-by-block pruning equals pruning each block by hand on
the activations of the pruned prefix; Wanda's score against a direct computation; counts and
N:M validity; token masks; the layer-by-layer fallback; errors; SparseGPT beats magnitude."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from prunescope.errors import ConfigError, PruningError  # noqa: E402
from prunescope.layerwise import prune_blocks  # noqa: E402
from prunescope.second_order.obc import reconstruct  # noqa: E402

LAYERS = ("attention.self.query", "attention.self.key", "attention.self.value",
          "attention.output.dense", "intermediate.dense", "output.dense")


class Text(nn.Module):
    """The project's text-model convention: x is int64 [N, 2, L] (token ids, attention mask)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=x[:, 0], attention_mask=x[:, 1])[0]


def bert(layers: int = 3, classifier: bool = False) -> Text:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    cls = transformers.BertForSequenceClassification if classifier else transformers.BertModel
    return Text(cls(config))


def batches(count: int = 2, size: int = 8, length: int = 12, seed: int = 1) -> list[torch.Tensor]:
    """Token ids with the last positions of every other sequence padded (mask 0)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, 100, (size, length), generator=generator)
        mask = torch.ones(size, length, dtype=torch.long)
        mask[::2, length - 4:] = 0
        out.append(torch.stack([ids, mask], dim=1))
    return out


def targets(model: Text, layers: int) -> list[str]:
    return [f"net.encoder.layer.{i}.{n}.weight" for i in range(layers) for n in LAYERS]


# -- a reference by hand ---------------------------------------------------------------------
def layer_inputs(model, names, inputs, token_masks=None) -> dict[str, list[torch.Tensor]]:
    """Per layer, its input rows per batch (float64), from full forwards of ``model``."""
    found: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    current = {}

    def hook(name):
        def capture(module, args):
            x = args[0]
            if current["mask"] is not None:
                x = x[current["mask"].bool()]
            found[name].append(x.reshape(-1, x.shape[-1]).double())
        return capture

    handles = [model.get_submodule(n.rpartition(".")[0]).register_forward_pre_hook(hook(n))
               for n in names]
    model.eval()
    with torch.no_grad():
        for i, x in enumerate(inputs):
            current["mask"] = None if token_masks is None else token_masks[i]
            model(x)
    for handle in handles:
        handle.remove()
    return found


def prune_by_hand(layer: nn.Linear, rows: list[torch.Tensor], solver: str, sparsity: float
                  ) -> torch.Tensor:
    """One layer pruned directly from its input rows; returns the keep-mask."""
    w = layer.weight.detach()
    if solver == "wanda":
        norms = sum(r.square().sum(0) for r in rows).sqrt()
        scores = w.abs().double() * norms
        k = math.floor((1 - sparsity) * w.shape[1] + 0.5)
        keep = torch.zeros_like(w, dtype=torch.bool)
        keep.scatter_(1, scores.argsort(dim=1, descending=True, stable=True)[:, :k], True)
        layer.weight.data[~keep] = 0.0
        return keep
    hessian = sum(r.T @ r for r in rows) / sum(len(r) for r in rows)
    new, keep, _ = reconstruct(w, hessian, live=torch.ones_like(w, dtype=torch.bool),
                               keep=math.floor((1 - sparsity) * w.numel() + 0.5),
                               dampening=0.01, block=128, bias=None, refit=False)
    layer.weight.data.copy_(new)
    return keep


def reference(model, steps, inputs, solver, sparsity, token_masks=None) -> dict:
    """Each step's layers pruned on their inputs in the model pruned so far (full forwards)."""
    kept = {}
    for names in steps:
        rows = layer_inputs(model, names, inputs, token_masks)
        for name in names:
            layer = model.get_submodule(name.rpartition(".")[0])
            kept[name] = prune_by_hand(layer, rows[name], solver, sparsity)
    return kept


def assert_same(model, other, mask, kept) -> None:
    for name, keep in kept.items():
        assert torch.equal(mask[name], keep), name
        ours = model.get_parameter(name)
        theirs = other.get_parameter(name)
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), name


# -- (a) sequential equals the hand reference --------------------------------------------------
@pytest.mark.parametrize("solver", ["wanda", "sparsegpt"])
def test_sequential_equals_pruning_each_block_on_the_pruned_prefix(solver):
    model = bert(3)
    names = targets(model, 3)
    inputs = batches()
    other = copy.deepcopy(model)
    mask = prune_blocks(model, inputs, names, solver=solver, sparsity=0.5, progress=False)
    steps = [names[i * 6:(i + 1) * 6] for i in range(3)]
    kept = reference(other, steps, inputs, solver, 0.5)
    assert list(mask) == names
    assert_same(model, other, mask, kept)
    if solver == "sparsegpt":  # kept weights were updated, not only masked
        dense = bert(3).get_parameter(names[-1])
        assert not torch.allclose(model.get_parameter(names[-1]), dense * mask[names[-1]])


def test_named_blocks_equal_automatic_ones_and_mode_is_restored():
    model, other = bert(2), bert(2)
    model.train()
    names = targets(model, 2)
    auto = prune_blocks(model, batches(), names, solver="wanda", sparsity=0.3)
    named = prune_blocks(other, batches(), names, solver="wanda", sparsity=0.3,
                         blocks="net.encoder.layer")
    assert auto.equal(named)
    assert model.training and all(m.training for m in model.modules())


class Block(nn.Module):
    """A block called with keywords only, returning a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, *, hidden_states: torch.Tensor, scale: torch.Tensor) -> tuple:
        return hidden_states + torch.relu(self.fc(hidden_states)) * scale, None


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(hidden_states=x, scale=torch.tensor(0.5))[0]
        return self.head(x)


def test_keyword_hidden_states_tuple_outputs_and_a_block_without_targets():
    torch.manual_seed(0)
    model = Stack()
    other = copy.deepcopy(model)
    inputs = [torch.randn(12, 8) for _ in range(2)]
    names = ["blocks.0.fc.weight", "blocks.2.fc.weight"]
    mask = prune_blocks(model, inputs, names, solver="sparsegpt", sparsity=0.5)
    kept = reference(other, [[n] for n in names], inputs, "sparsegpt", 0.5)
    assert_same(model, other, mask, kept)
    assert torch.equal(model.blocks[1].fc.weight, other.blocks[1].fc.weight)


# -- (b) Wanda against a direct computation ----------------------------------------------------
def test_wanda_keeps_per_row_top_of_weight_times_input_norm():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    x = torch.tensor([[10.0, 1.0, 1.0, 1.0]])  # column norms 10, 1, 1, 1
    mask = prune_blocks(nn.Sequential(layer), [x], ["0.weight"], solver="wanda", sparsity=0.5)
    # scores row 0: 10, 2, 3, 4 -> keep 0, 3; row 1: 40, 3, 2, 1 -> keep 0, 1
    assert mask["0.weight"].tolist() == [[True, False, False, True], [True, True, False, False]]
    assert layer.weight.tolist() == [[1.0, 0.0, 0.0, 4.0], [4.0, 3.0, 0.0, 0.0]]


def test_wanda_equals_direct_score_on_a_random_linear():
    torch.manual_seed(3)
    layer = nn.Linear(16, 8)
    weight = layer.weight.detach().clone()
    inputs = [torch.randn(5, 16) * torch.linspace(0.1, 3, 16) for _ in range(3)]
    mask = prune_blocks(nn.Sequential(layer), inputs, ["0.weight"], solver="wanda", sparsity=0.75)
    scores = weight.abs() * torch.cat(inputs).norm(dim=0)
    expected = torch.zeros_like(weight, dtype=torch.bool)
    expected.scatter_(1, scores.topk(4, dim=1).indices, True)
    assert torch.equal(mask["0.weight"], expected)
    assert torch.equal(layer.weight, weight * expected)


# -- (c) counts and N:M --------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["magnitude", "wanda", "sparsegpt"])
def test_exact_counts_and_zeroed_weights(solver):
    model = bert(2)
    names = targets(model, 2)
    mask = prune_blocks(model, batches(), names, solver=solver, sparsity=0.6)
    for name in names:
        keep, weight = mask[name], model.get_parameter(name)
        if solver == "wanda":
            assert (keep.sum(1) == round(0.4 * keep.shape[1])).all()
        else:
            assert int(keep.sum()) == round(0.4 * keep.numel())
        assert (weight[~keep] == 0).all()
    if solver == "magnitude":  # the largest |w| of each layer
        dense = bert(2).get_parameter(names[0]).abs()
        assert dense[mask[names[0]]].min() >= dense[~mask[names[0]]].max()


@pytest.mark.parametrize("solver", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_groups(solver):
    model = bert(2)
    names = targets(model, 2)
    mask = prune_blocks(model, batches(), names, solver=solver, pattern="2:4")
    for name in names:
        groups = mask[name].reshape(mask[name].shape[0], -1, 4).sum(-1)
        assert (groups == 2).all(), name
        assert (model.get_parameter(name)[~mask[name]] == 0).all()


def test_conv_fallback_counts_and_channel_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    inputs = [torch.randn(2, 4, 6, 6)]
    dense = copy.deepcopy(model)
    mask = prune_blocks(model, inputs, ["0.weight", "2.weight"], solver="sparsegpt",
                        sparsity=0.5)
    assert [int(mask[n].sum()) for n in mask] == [144, 144]
    for solver in ("wanda", "sparsegpt"):
        mask = prune_blocks(copy.deepcopy(dense), inputs, ["0.weight", "2.weight"],
                            solver=solver, pattern="2:4")
        for name in mask:  # groups of 4 input channels at each kernel position
            assert (mask[name].movedim(1, -1).reshape(-1, 4).sum(-1) == 2).all()


def test_already_zero_weights_stay_pruned():
    model = bert(2)
    names = targets(model, 2)
    prune_blocks(model, batches(), names, solver="magnitude", sparsity=0.5)
    before = {n: model.get_parameter(n) != 0 for n in names}
    mask = prune_blocks(model, batches(), names, solver="sparsegpt", sparsity=0.3)
    for name in names:
        assert not (mask[name] & ~before[name]).any()
        assert torch.equal(mask[name], before[name])  # fewer live weights than asked: all kept


# -- (d) token masks -----------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["wanda", "sparsegpt"])
def test_token_masks_exclude_padded_positions(solver):
    inputs = batches()
    changed = [x.clone() for x in inputs]
    for x in changed:
        x[:, 0][x[:, 1] == 0] = 7  # other ids on the padded positions only
    results = []
    for data, masked in ((inputs, True), (changed, True), (inputs, False), (changed, False)):
        model = bert(2)
        masks = [x[:, 1] for x in data] if masked else None
        mask = prune_blocks(model, data, targets(model, 2), solver=solver, sparsity=0.5,
                            token_masks=masks)
        results.append((mask, model.state_dict()))

    def same(a, b):
        return a[0].equal(b[0]) and all(torch.allclose(a[1][k], b[1][k], atol=1e-6)
                                        for k in a[1])

    assert same(results[0], results[1])
    assert not same(results[2], results[3])  # without masks the padded tokens do count
    model = bert(2)  # the hand reference with masked rows
    kept = reference(model, [targets(model, 2)[:6], targets(model, 2)[6:]], inputs, solver, 0.5,
                     token_masks=[x[:, 1] for x in inputs])
    assert all(torch.equal(results[0][0][n], k) for n, k in kept.items())


# -- (e) the fallback for models without blocks ------------------------------------------------
@pytest.mark.parametrize("solver", ["wanda", "sparsegpt"])
def test_mlp_fallback_prunes_layer_by_layer_on_the_pruned_prefix(solver):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    names = ["0.weight", "2.weight", "4.weight"]
    inputs = [torch.randn(10, 12) for _ in range(2)]
    other = copy.deepcopy(model)
    mask = prune_blocks(model, inputs, list(reversed(names)), solver=solver, sparsity=0.5)
    kept = reference(other, [[n] for n in names], inputs, solver, 0.5)
    assert list(mask) == list(reversed(names))
    assert_same(model, other, mask, kept)


# -- (f) bad input ---------------------------------------------------------------------------------
def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_bad_requests_raise_one_line_errors():
    model = bert(2, classifier=True)
    inner = [n.replace("net.", "net.bert.", 1) for n in targets(model, 2)]
    data = batches(1)
    with pytest.raises(ConfigError) as err:
        prune_blocks(model, data, inner, solver="obs", sparsity=0.5)
    assert "magnitude, wanda, sparsegpt" in one_line(err)
    with pytest.raises(PruningError) as err:
        prune_blocks(model, data, [*inner, "net.classifier.weight"], solver="wanda",
                     sparsity=0.5)
    assert "net.classifier.weight" in one_line(err) and "exclude" in one_line(err)
    with pytest.raises(PruningError) as err:
        prune_blocks(model, data, inner, solver="sparsegpt", pattern="2:3")
    assert "net.bert.encoder.layer.0.attention.self.query.weight" in one_line(err)
    with pytest.raises(PruningError) as err:
        prune_blocks(model, data, [], solver="wanda", sparsity=0.5)
    assert "no targets" in one_line(err)
    with pytest.raises(ConfigError) as err:
        prune_blocks(model, data, inner, solver="wanda", pattern="block:1x4", sparsity=0.5)
    assert "N:M" in one_line(err)
    with pytest.raises(ConfigError) as err:
        prune_blocks(model, data, inner, solver="wanda")
    assert "sparsity" in one_line(err)
    with pytest.raises(ConfigError) as err:
        prune_blocks(model, data, inner, solver="wanda", sparsity=0.5, blocks="net.bert")
    assert "ModuleList" in one_line(err)
    with pytest.raises(PruningError) as err:
        prune_blocks(model, data, ["net.bert.embeddings.LayerNorm.weight"], solver="wanda",
                     sparsity=0.5)
    one_line(err)
    with pytest.raises(PruningError) as err:  # a conv-shaped input cannot take token masks
        prune_blocks(nn.Sequential(nn.Conv2d(1, 2, 1)), [torch.ones(1, 1, 2, 2)], ["0.weight"],
                     solver="wanda", sparsity=0.5, token_masks=[torch.ones(1, 2)])
    one_line(err)


def test_few_calibration_tokens_warn_once(caplog):
    model = bert(2)
    with caplog.at_level(logging.WARNING, logger="prunescope.layerwise"):
        prune_blocks(model, batches(1, size=2, length=8), targets(model, 2), solver="sparsegpt",
                     sparsity=0.5)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "only 16 calibration rows" in lines[0] and "at least 32" in lines[0]


# -- (g) what SparseGPT is for ---------------------------------------------------------------------
def test_sparsegpt_reconstructs_calibration_outputs_better_than_magnitude():
    inputs = batches(2, size=16)
    dense = bert(3)
    with torch.no_grad():
        wanted = [dense(x) for x in inputs]
    errors = {}
    for solver in ("magnitude", "sparsegpt"):
        model = bert(3)
        mask = prune_blocks(model, inputs, targets(model, 3), solver=solver, sparsity=0.5)
        assert mask.sparsity == pytest.approx(0.5)
        with torch.no_grad():
            errors[solver] = sum(float((model(x) - y).square().sum())
                                 for x, y in zip(inputs, wanted, strict=True))
    assert errors["sparsegpt"] < 0.5 * errors["magnitude"]
