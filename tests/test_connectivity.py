"""Tests of prunescope.connectivity against brute-force path enumeration."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunescope import models
from prunescope.connectivity import effective_mask, effective_sparsity, layer_sparsities
from prunescope.errors import PruningError
from prunescope.mask import Mask
from prunescope.targets import default_targets


def random_mask(model: nn.Module, density: float, seed: int) -> Mask:
    generator = torch.Generator().manual_seed(seed)
    return Mask({n: torch.rand(model.get_parameter(n).shape, generator=generator) < density
                 for n in default_targets(model)})


# -- MLP: enumerate every input -> output path -----------------------------------------------
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))


NAMES = ["0.weight", "2.weight", "4.weight"]


def brute_force_mlp(keeps: list[torch.Tensor]) -> list[torch.Tensor]:
    """An edge is effective iff some input -> output path of kept edges uses it."""
    sizes = [keeps[0].shape[1]] + [keep.shape[0] for keep in keeps]
    effective = [torch.zeros_like(keep) for keep in keeps]
    for path in itertools.product(*(range(size) for size in sizes)):
        edges = [(layer, path[layer + 1], path[layer]) for layer in range(len(keeps))]
        if all(keeps[layer][out, inp] for layer, out, inp in edges):
            for layer, out, inp in edges:
                effective[layer][out, inp] = True
    return effective


def test_mlp_effective_mask_equals_path_enumeration() -> None:
    model, differs = mlp(), 0
    for seed in range(20):
        mask = random_mask(model, 0.4, seed)
        expected = brute_force_mlp([mask[n] for n in NAMES])
        got = effective_mask(model, mask)
        assert list(got) == NAMES
        for name, want in zip(NAMES, expected, strict=True):
            assert torch.equal(got[name], want), (seed, name)
        differs += not got.equal(mask)
    assert differs >= 5  # the cases are not all trivially fully connected


def test_effective_mask_is_a_subset_and_idempotent() -> None:
    model = mlp()
    for seed in range(5):
        mask = random_mask(model, 0.4, seed)
        effective = effective_mask(model, mask)
        assert all(not (effective[n] & ~mask[n]).any() for n in mask)
        assert effective_mask(model, effective).equal(effective)
        assert effective_sparsity(model, mask) == effective.sparsity >= mask.sparsity


def test_cutting_all_inbound_edges_kills_the_outbound_ones() -> None:
    model = mlp()
    keeps = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()
             if n in NAMES}
    keeps["0.weight"][1] = False  # hidden unit 1 has no input
    effective = effective_mask(model, Mask(keeps))
    assert not effective["2.weight"][:, 1].any()
    assert effective["2.weight"][:, [0, 2]].all() and effective["4.weight"].all()


def test_cutting_all_outbound_edges_kills_the_inbound_ones() -> None:
    model = mlp()
    keeps = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()
             if n in NAMES}
    keeps["4.weight"][:, 2] = False  # second hidden unit 2 reaches no output
    effective = effective_mask(model, Mask(keeps))
    assert not effective["2.weight"][2].any()
    assert effective["2.weight"][:2].all() and effective["0.weight"].all()


def test_uncovered_layers_count_as_kept_and_biases_as_direct() -> None:
    model = mlp()
    mask = random_mask(model, 0.4, seed=3)
    partial = Mask({"0.weight": mask["0.weight"], "2.weight": mask["2.weight"],
                    "2.bias": torch.tensor([True, False, True])})
    expected = brute_force_mlp([mask["0.weight"], mask["2.weight"], torch.ones(2, 3).bool()])
    got = effective_mask(model, partial)
    assert torch.equal(got["0.weight"], expected[0]) and torch.equal(got["2.weight"], expected[1])
    assert torch.equal(got["2.bias"], partial["2.bias"])


def test_weights_do_not_matter_only_the_mask() -> None:
    model, mask = mlp(), random_mask(mlp(), 0.4, seed=1)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(-1e-30)
    assert effective_mask(model, mask).equal(effective_mask(mlp(), mask))


def test_input_shape_is_needed_for_conv_nets() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.ones(1, 1, 4, 4))
    mask = random_mask(model, 0.5, seed=0)
    with pytest.raises(PruningError, match="input_shape"):
        effective_mask(model, mask)
    assert effective_mask(model, mask, input_shape=(1, 4, 4)).num_total == mask.num_total


# -- conv nets: explicit per-weight dense matrices and graph reachability ----------------------
def conv_edges(conv: nn.Conv2d, shape: tuple[int, int, int]) -> torch.Tensor:
    """``edges[k, o, i]``: weight element k connects input position i to output position o.

    Each entry is read off the dense Jacobian of the conv with a one-hot weight (torch.func).
    """
    weight = conv.weight.detach().double()
    ones = torch.ones(1, *shape, dtype=torch.float64)
    edges = []
    for k in range(weight.numel()):
        onehot = torch.zeros(weight.numel(), dtype=torch.float64)
        onehot[k] = 1.0
        jacobian = torch.func.jacrev(F.conv2d)(ones, onehot.view_as(weight), None, conv.stride,
                                               conv.padding)
        edges.append(jacobian.reshape(-1, ones.numel()) != 0)
    return torch.stack(edges)


def pool_edges(channels: int, size: int, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """``[out, in]``: the window of every pooling output, with explicit loops."""
    out_size = (size + 2 * padding - kernel) // stride + 1
    edges = torch.zeros(channels * out_size ** 2, channels * size ** 2, dtype=torch.bool)
    for c, r, s in itertools.product(range(channels), range(out_size), range(out_size)):
        for a, b in itertools.product(range(kernel), range(kernel)):
            row, col = r * stride - padding + a, s * stride - padding + b
            if 0 <= row < size and 0 <= col < size:
                edges[(c * out_size + r) * out_size + s, (c * size + row) * size + col] = True
    return edges


class Layer:
    """A prunable layer of the brute-force graph: its edges per weight and its kept adjacency."""

    def __init__(self, edges: torch.Tensor, keep: torch.Tensor) -> None:
        self.edges, self.keep = edges, keep.flatten()
        self.adjacency = (edges & self.keep[:, None, None]).any(0)

    def forward(self, reached: torch.Tensor) -> torch.Tensor:
        return (self.adjacency.double() @ reached.double()) > 0

    def backward(self, reaches: torch.Tensor) -> torch.Tensor:
        return (self.adjacency.double().T @ reaches.double()) > 0

    def effective(self, reached_in: torch.Tensor, reaches_out: torch.Tensor) -> torch.Tensor:
        live = reaches_out[:, None] & reached_in[None, :]
        return self.keep & (self.edges & live).flatten(1).any(1)


def linear_edges(layer: nn.Linear) -> torch.Tensor:
    out, inp = layer.weight.shape
    edges = torch.zeros(out * inp, out, inp, dtype=torch.bool)
    for o, i in itertools.product(range(out), range(inp)):
        edges[o * inp + i, o, i] = True
    return edges


class TinyResNet(nn.Module):
    """Stem conv, two residual blocks (conv-BN-ReLU-conv-BN + skip), average pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"conv1": nn.Conv2d(2, 2, 3, padding=1, bias=False),
                           "bn1": nn.BatchNorm2d(2), "relu": nn.ReLU(),
                           "conv2": nn.Conv2d(2, 2, 3, padding=1, bias=False),
                           "bn2": nn.BatchNorm2d(2)})
            for _ in range(2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)
        self.input_shape = (1, 3, 3)
        with torch.no_grad():  # trained-looking norms: signed scales, shifts and statistics
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.weight.uniform_(-2, 2)
                    module.bias.uniform_(-1, 1)
                    module.running_mean.uniform_(-1, 1)
                    module.running_var.uniform_(0.1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            out = block["relu"](block["bn1"](block["conv1"](x)))
            x = block["relu"](block["bn2"](block["conv2"](out)) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_edges(model: TinyResNet) -> dict[str, torch.Tensor]:
    edges = {"stem.weight": conv_edges(model.stem, (1, 3, 3))}
    for b, block in enumerate(model.blocks):
        for c in ("conv1", "conv2"):
            edges[f"blocks.{b}.{c}.weight"] = conv_edges(block[c], (2, 3, 3))
    edges["fc.weight"] = linear_edges(model.fc)
    return edges


def brute_force_resnet(edges: dict[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
    layers = {name: Layer(edges[name], mask[name]) for name in edges}
    pool = pool_edges(2, 3, kernel=3, stride=1, padding=0)  # global average = one 3x3 window
    block_names = [(f"blocks.{b}.conv1.weight", f"blocks.{b}.conv2.weight") for b in range(2)]
    # forward reachability from the input
    reached = {"x0": torch.ones(9, dtype=torch.bool)}
    reached["s0"] = layers["stem.weight"].forward(reached["x0"])
    for b, (first, second) in enumerate(block_names):
        reached[f"a{b}"] = layers[first].forward(reached[f"s{b}"])
        reached[f"s{b + 1}"] = layers[second].forward(reached[f"a{b}"]) | reached[f"s{b}"]
    reached["p"] = (pool.double() @ reached["s2"].double()) > 0
    # backward reachability from the outputs
    reaches = {"out": torch.ones(3, dtype=torch.bool)}
    reaches["p"] = layers["fc.weight"].backward(reaches["out"])
    reaches["s2"] = (pool.double().T @ reaches["p"].double()) > 0
    for b in (1, 0):
        first, second = block_names[b]
        reaches[f"a{b}"] = layers[second].backward(reaches[f"s{b + 1}"])
        reaches[f"s{b}"] = layers[first].backward(reaches[f"a{b}"]) | reaches[f"s{b + 1}"]
    ends = {"stem.weight": ("x0", "s0"), "fc.weight": ("p", "out")}
    for b, (first, second) in enumerate(block_names):
        ends[first], ends[second] = (f"s{b}", f"a{b}"), (f"a{b}", f"s{b + 1}")
    return {name: layer.effective(reached[ends[name][0]], reaches[ends[name][1]])
            .view_as(mask[name]) for name, layer in layers.items()}


def test_residual_conv_net_equals_brute_force() -> None:
    torch.manual_seed(0)
    model, differs = TinyResNet(), 0
    edges = resnet_edges(model)
    for seed in range(6):
        mask = random_mask(model, 0.2, seed)
        expected = brute_force_resnet(edges, mask)
        got = effective_mask(model, mask)
        for name in mask:
            assert torch.equal(got[name], expected[name]), (seed, name)
        differs += not got.equal(mask)
    assert differs >= 3


def test_residual_skip_keeps_a_cut_branch_outside_the_block_effective() -> None:
    torch.manual_seed(0)
    model = TinyResNet()
    keeps = {n: torch.ones_like(model.get_parameter(n), dtype=torch.bool)
             for n in default_targets(model)}
    keeps["blocks.0.conv2.weight"][:] = False  # the first block's branch is cut ...
    effective = effective_mask(model, Mask(keeps))
    assert not effective["blocks.0.conv1.weight"].any()  # ... so its first conv is dead
    assert effective["stem.weight"].all() and effective["blocks.1.conv1.weight"].all()


class ConvPool(nn.Module):
    """Conv 3x3 (1 -> 2) on 4x4, ReLU, MaxPool 3 / stride 2 / pad 1 -> 2x2, conv 2x2, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 2)
        self.fc = nn.Linear(2, 2)
        self.input_shape = (1, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        return self.fc(torch.flatten(self.relu(self.conv2(x)), 1))


def test_max_pool_counts_every_path_in_its_window() -> None:
    torch.manual_seed(0)
    model, differs = ConvPool(), 0
    edges1, edges2 = conv_edges(model.conv1, (1, 4, 4)), conv_edges(model.conv2, (2, 2, 2))
    pool, fc_edges = pool_edges(2, 4, kernel=3, stride=2, padding=1), linear_edges(model.fc)
    for seed in range(8):
        mask = random_mask(model, 0.3, seed)
        conv1 = Layer(edges1, mask["conv1.weight"])
        conv2 = Layer(edges2, mask["conv2.weight"])
        fc = Layer(fc_edges, mask["fc.weight"])
        h1 = conv1.forward(torch.ones(16, dtype=torch.bool))
        p = (pool.double() @ h1.double()) > 0
        h2 = conv2.forward(p)
        back_h2 = fc.backward(torch.ones(2, dtype=torch.bool))
        back_p = conv2.backward(back_h2)
        back_h1 = (pool.double().T @ back_p.double()) > 0
        expected = {
            "conv1.weight": conv1.effective(torch.ones(16, dtype=torch.bool), back_h1),
            "conv2.weight": conv2.effective(p, back_h2),
            "fc.weight": fc.effective(h2, torch.ones(2, dtype=torch.bool)),
        }
        got = effective_mask(model, mask)
        for name in mask:
            assert torch.equal(got[name].flatten(), expected[name]), (seed, name)
        differs += not got.equal(mask)
    assert differs >= 2


def test_max_pool_window_keeps_every_unit_that_feeds_it() -> None:
    # Linear(3 -> 8) viewed as 2 channels of 2x2, one 2x2 max pool per channel, Linear(2 -> 2):
    # a path runs through every unit of a window, not only through the window's maximum.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Unflatten(1, (2, 2, 2)), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(2, 2))
    dense = Mask.ones(model)
    assert effective_mask(model, dense).equal(dense)
    for seed in range(10):
        mask = random_mask(model, 0.3, seed)
        first, last = mask["0.weight"], mask["4.weight"]
        channel_reached = first.view(2, 4, 3).any(2).any(1)  # some unit of the channel has input
        channel_reaches = last.any(0)  # the pooled channel feeds some output
        expected_first = first & channel_reaches.repeat_interleave(4)[:, None]
        expected_last = last & channel_reached[None, :]
        got = effective_mask(model, mask)
        assert torch.equal(got["0.weight"], expected_first), seed
        assert torch.equal(got["4.weight"], expected_last), seed


# -- the model zoo ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet20", "vgg11"])
def test_zoo_models_at_half_sparsity(name: str) -> None:
    torch.manual_seed(0)
    model = models.build(name)
    dense = Mask.ones(model)
    assert effective_mask(model, dense).equal(dense)
    mask = random_mask(model, 0.5, seed=0)
    assert effective_sparsity(model, mask) >= mask.sparsity
    sparsest = random_mask(model, 0.02, seed=0)
    assert 1.0 > effective_sparsity(model, sparsest) > sparsest.sparsity


def test_layer_sparsities() -> None:
    model = mlp()
    mask = random_mask(model, 0.4, seed=2)
    report = layer_sparsities(model, mask)
    effective = effective_mask(model, mask).sparsities()
    assert list(report) == NAMES
    for name, row in report.items():
        assert set(row) == {"direct", "effective"}
        assert row == {"direct": mask.sparsities()[name], "effective": effective[name]}
        assert row["effective"] >= row["direct"]
