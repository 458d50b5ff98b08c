"""Tests of the lanes-layout inference operators (activations batch-innermost between sparse
layers: ``to_lanes``, ``from_lanes``, ``linear_lanes``, ``conv_lanes``, ``max_pool_lanes``) against
PyTorch, on every instruction-set variant this CPU runs, and of the compiled forward that chains
them (runtime._LanesCodegen): the same outputs as the dense masked model, and the plan it makes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_inference import export_registry, pruned
from test_kernels import assert_close, variant  # noqa: F401 - variant is a fixture
from torch import nn

from prunescope.kernels import backend, formats, runtime
from prunescope.kernels.modules import SparseConv2d
from prunescope.mask import Mask

pytestmark = pytest.mark.skipif(not backend().fast, reason="needs the fast kernels")


def ops():
    return backend().ops


def sparse_weight(shape: tuple[int, ...], density: float, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=generator) < density
    mask[0] = False  # an all-pruned output row
    return torch.randn(shape, generator=generator) * mask, mask


def lanes(x: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [..., N] in PyTorch."""
    return x.movedim(0, -1).contiguous()


# -- the operators ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6, 2), (1, 9), (0, 3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layout_changes_are_exact_inverses(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    t = ops().to_lanes(x)
    assert torch.equal(t, lanes(x))
    assert torch.equal(ops().from_lanes(t), x)


@pytest.mark.parametrize("batch", [1, 7, 16, 64, 100])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_lanes_equals_the_dense_layer(variant, batch, relu, threads):  # noqa: F811
    weight, mask = sparse_weight((300, 784), 0.1)
    bias = torch.randn(300)
    c = formats.compress(weight, mask)
    x = torch.randn(batch, 784)
    expected = F.linear(x, weight, bias)
    if relu:
        expected = expected.relu()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # 2 threads, 64+ lanes: each thread owns a range of lanes
    try:
        y = ops().linear_lanes(lanes(x), c.values, bias, c.ptr, c.idx, 784, relu)
        y_from = ops().linear_lanes(x, c.values, bias, c.ptr, c.idx, 784, relu, True, False)
        y_to = ops().linear_lanes(lanes(x), c.values, bias, c.ptr, c.idx, 784, relu, False, True)
        y_both = ops().linear_lanes(x, c.values, bias, c.ptr, c.idx, 784, relu, True, True)
    finally:
        torch.set_num_threads(previous)
    assert_close(y, lanes(expected))
    assert_close(y_from, lanes(expected))  # standard input, transposed inside the call
    assert_close(y_to, expected)  # standard output, written transposed
    assert_close(y_both, expected)


def test_linear_lanes_without_bias_and_with_column_blocks(variant):  # noqa: F811
    weight, mask = sparse_weight((128, 1536), 0.2, seed=1)  # weights in cache: column blocks
    c = formats.compress(weight, mask)
    x = torch.randn(64, 1536)
    y = ops().linear_lanes(lanes(x), c.values, None, c.ptr, c.idx, 1536, False)
    assert_close(y, lanes(F.linear(x, weight)))


@pytest.mark.parametrize("threads", [1, 2])
def test_linear_lanes_with_blocks_of_an_input_beyond_l2(variant, threads):  # noqa: F811
    """Weights beyond L2 (1.6 MB) and an input of 16384 features x 64 lanes (4 MiB, more than
    any core's L2 budget): the input in L2-sized column blocks, the rows' partial sums kept
    between them (Conv-2's first Linear)."""
    weight, mask = sparse_weight((96, 16384), 0.13, seed=2)
    c = formats.compress(weight, mask)
    assert c.values.numel() * 8 > 1 << 20
    x = torch.randn(64, 16384)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = ops().linear_lanes(lanes(x), c.values, None, c.ptr, c.idx, 16384, True)
    finally:
        torch.set_num_threads(previous)
    assert_close(y, lanes(F.linear(x, weight).relu()))


def mlp(widths: list[int], density: float, biases: list[bool], seed: int = 0):
    """Random sparse layers of ``widths`` as (weight, bias or None, compressed) triples."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:], strict=False)):
        weight, mask = sparse_weight((n_out, n_in), density, seed + i)
        bias = torch.randn(n_out) if biases[i] else None
        layers.append((weight, bias, formats.compress(weight, mask)))
    return layers


def chain_args(layers) -> list[torch.Tensor]:
    args = []
    for _, bias, c in layers:
        args += [c.values, torch.empty(0) if bias is None else bias, c.ptr, c.idx]
    return args


@pytest.mark.parametrize("batch", [1, 7, 64, 100])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("from_std", [True, False])
@pytest.mark.parametrize("widths, density", [([784, 300, 100, 10], 0.1),  # one parallel region
                                             ([2048, 300, 10], 0.3)])  # 1.5 MB: layer by layer
def test_linear_chain_equals_the_layers_one_by_one(variant, batch, threads, from_std,  # noqa: F811
                                                   widths, density):
    layers = mlp(widths, density, [True, False, True])
    relus = [1] * (len(layers) - 1) + [0]
    x = torch.randn(batch, widths[0])
    expected = x
    for (weight, bias, _), relu in zip(layers, relus, strict=True):
        expected = F.linear(expected, weight, bias)
        expected = expected.relu() if relu else expected
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = ops().linear_chain(x if from_std else lanes(x), chain_args(layers), widths[:-1],
                               relus, from_std)
    finally:
        torch.set_num_threads(previous)
    assert_close(y, expected)


def test_a_chain_of_mismatched_widths_is_refused():
    layers = mlp([6, 5, 4], 0.5, [False, False])
    with pytest.raises(RuntimeError, match="layer 1 takes 6 features, layer 0 gives 5"):
        ops().linear_chain(torch.randn(2, 6), chain_args(layers), [6, 6], [0, 0], True)
    with pytest.raises(RuntimeError, match="four tensors"):
        ops().linear_chain(torch.randn(2, 6), chain_args(layers)[:-1], [6, 5], [0, 0], True)


def test_a_fused_relu_keeps_nan_as_torch_relu_does(variant):  # noqa: F811
    weight, mask = sparse_weight((8, 16), 1.0)
    mask[0] = True
    c = formats.compress(weight, mask)
    x = torch.randn(16, 16)
    x[3, 5] = float("nan")
    y = ops().linear_lanes(lanes(x), c.values, None, c.ptr, c.idx, 16, True)
    expected = lanes(F.linear(x, weight).relu())
    assert torch.equal(y.isnan(), expected.isnan()) and y[:, 3].isnan().all()
    assert_close(y.nan_to_num(), expected.nan_to_num())


CONVS = [  # in, out, kernel, stride, padding, dilation, groups
    (3, 8, 3, 1, 1, 1, 1), (4, 6, 3, 2, 1, 1, 2), (6, 6, (2, 3), 1, "same", (1, 2), 1),
    (5, 4, 1, 1, 0, 1, 1), (4, 4, 3, (2, 1), (2, 1), 1, 4), (3, 5, 5, 3, 2, 1, 1),
]


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("batch", [1, 9, 32])
@pytest.mark.parametrize("relu", [False, True])
def test_conv_lanes_equals_the_dense_layer(variant, conv, batch, relu):  # noqa: F811
    c_in, c_out, kernel, stride, padding, dilation, groups = conv
    torch.manual_seed(0)
    dense = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups)
    _, mask = sparse_weight(tuple(dense.weight.shape), 0.5)
    layer = SparseConv2d.from_dense(dense, mask)
    with torch.no_grad():
        dense.weight.mul_(mask)
    x = torch.randn(batch, c_in, 11, 10)
    with torch.no_grad():
        expected = dense(x)
        if relu:
            expected = expected.relu()
    values, bias, ptr, idx = layer._kernel_args()[:4]
    with torch.no_grad():  # the layer's values are parameters
        y = ops().conv_lanes(lanes(x), values, bias, ptr, idx, layer.geometry(), relu, [])
    assert_close(y, lanes(expected))


@pytest.mark.parametrize("out_pad", [[1, 1, 1, 1], [0, 2, 1, 0]])
def test_conv_lanes_writes_the_next_layers_zero_margins(variant, out_pad):  # noqa: F811
    weight, mask = sparse_weight((6, 3, 3, 3), 0.5)
    c = formats.compress(weight, mask)
    x = torch.randn(4, 3, 9, 8)
    geometry = [3, 6, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    y = ops().conv_lanes(lanes(x), c.values, None, c.ptr, c.idx, geometry, True, out_pad)
    top, bottom, left, right = out_pad
    expected = F.pad(F.conv2d(x, weight, padding=1).relu(), (left, right, top, bottom))
    assert torch.equal(y[y.new_ones(y.shape, dtype=torch.bool)], y.flatten())  # contiguous
    assert_close(y, lanes(expected))  # margins exactly zero: the padded tensor equals it


@pytest.mark.parametrize("size", [(8, 8), (9, 7), (2, 3)])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_conv_can_pool_its_own_output(variant, size, threads):  # noqa: F811
    weight, mask = sparse_weight((64, 3, 3, 3), 0.5)
    bias = torch.randn(64)
    bias[5] = float("nan")  # (a NaN input would reach only the kept taps: dense differs)
    c = formats.compress(weight, mask)
    x = torch.randn(16, 3, *size)
    geometry = [3, 64, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = ops().conv_lanes(lanes(x), c.values, bias, c.ptr, c.idx, geometry, True, [], True)
    finally:
        torch.set_num_threads(previous)
    expected = lanes(F.max_pool2d(F.conv2d(x, weight, bias, padding=1).relu(), 2))
    assert torch.equal(y.isnan(), expected.isnan()) and y.isnan().any()
    assert_close(y.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("shape", [(3, 8, 8, 5), (2, 7, 9, 16), (1, 2, 2, 1), (4, 3, 2, 3),
                                   (2, 4, 6, 37)])
def test_max_pool_lanes_equals_pytorchs(variant, shape):  # noqa: F811
    """Every lane count (whole vectors and a masked rest), a NaN in each of a window's four
    places: the pooled output is NaN there, as torch's."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    channels, lanes_ = shape[0], shape[-1]
    for k, (dh, dw) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):  # the first window's places
        x[k % channels, dh, dw, (k * 7) % lanes_] = float("nan")
    expected = lanes(F.max_pool2d(x.movedim(-1, 0), 2))
    y = ops().max_pool_lanes(x)
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.nan_to_num(), expected.nan_to_num())


def test_the_lanes_operators_refuse_autograd():
    weight, mask = sparse_weight((4, 6), 0.5)
    c = formats.compress(weight, mask)
    x = torch.randn(6, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        ops().linear_lanes(x, c.values, None, c.ptr, c.idx, 6, False)


def test_an_input_of_the_wrong_width_is_refused_not_read_out_of_bounds():
    weight, mask = sparse_weight((4, 6), 0.5)
    c = formats.compress(weight, mask)
    with pytest.raises(RuntimeError, match="the input has 5 features, the layer takes 6"):
        ops().linear_lanes(torch.randn(3, 5), c.values, None, c.ptr, c.idx, 6, False, True)
    with pytest.raises(RuntimeError, match=r"the layer takes \[N, 6\]"):
        ops().sparse_linear(torch.randn(3, 5), c.values, None, c.ptr, c.idx, c.cptr, c.cperm,
                            c.crow)


# -- the compiled forward --------------------------------------------------------------------------

class Chain(nn.Module):
    """A strided conv, a conv reading the first one's output with padding, dropout, pooling,
    flatten, a Linear the swap rule may keep dense, sparse Linear layers and an output also read
    by a second consumer (no ReLU fusion there)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.pool = nn.MaxPool2d(2)
        self.c = nn.Linear(8 * 4 * 4, 32)
        self.d = nn.Linear(32, 16)
        self.e = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool(self.drop(torch.relu(self.b(F.relu(self.a(x))))))
        h = self.d(torch.relu(self.c(torch.flatten(x, 1))))
        return self.e(torch.relu(h)) + h[:, :5]


def exported(tmp_path, model: nn.Module, names: list[str], sparsity: float = 0.6):
    generator = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    mask = Mask({n: torch.rand(params[n].shape, generator=generator) >= sparsity
                 for n in names})
    mask.apply_(model)
    out = tmp_path / "m.sparse.safetensors"
    runtime.export(model, dict(mask.items()), out, spec={})
    return out


def test_a_chain_runs_in_the_lanes_layout_and_equals_the_dense_model(tmp_path):
    torch.manual_seed(0)
    model = Chain().eval()
    out = exported(tmp_path, model, ["a.weight", "b.weight", "c.weight", "d.weight", "e.weight"])
    x = torch.randn(6, 3, 16, 16)
    loaded = runtime.load(out, model=Chain(), example=x[:2], min_speedup=0.0, log=None)
    source = loaded.compiled.source  # min_speedup 0: every layer stays sparse, whatever timed
    # every layer in lanes: the input converted for the first conv, h for the sum; e writes the
    # standard layout itself
    assert source.count("_t = ") == 2, source
    for n in (3, 6, 13):
        x = torch.randn(n, 3, 16, 16)
        with torch.no_grad():
            expected = model(x)
        assert_close(loaded(x), expected)


def test_a_dense_layer_the_swap_rule_kept_runs_inside_the_chain(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Chain().eval()
    out = exported(tmp_path, model, ["a.weight", "b.weight", "c.weight", "d.weight", "e.weight"])
    calls = []

    def fake(layers, example, repeats):  # the fourth layer (d) "measures" faster dense
        calls.append(len(calls))
        return (1.0, 5.0) if len(calls) == 4 else (5.0, 1.0)

    monkeypatch.setattr(runtime, "_fastest", fake)
    loaded = runtime.load(out, model=Chain(), example=torch.zeros(2, 3, 16, 16), log=None)
    assert [c["sparse"] for c in loaded.choices] == [True, True, True, False, True]
    assert "torch.addmm(" in loaded.compiled.source  # d as W @ x on the lanes activation
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    assert_close(loaded(x), expected)


def test_the_fused_relu_and_the_written_margins_are_planned(tmp_path):
    torch.manual_seed(0)
    model = Chain().eval()
    out = exported(tmp_path, model, ["a.weight", "b.weight", "c.weight", "d.weight", "e.weight"])
    net = runtime.load(out, model=Chain(), trace=False).net
    graph = runtime._Tracer().trace(net)
    shapes = runtime._shapes(net, graph, torch.zeros(2, 3, 16, 16))
    codegen = runtime._LanesCodegen(net, shapes, lambda x: x, 4)
    codegen.plan(list(graph.nodes))
    by_target = {n.target: n for n in graph.nodes}
    assert {n.target for n in codegen.fused} == {"a", "b", "c"}  # d's output has two readers
    assert {n.target for n in codegen.out_pad} == {"a"}  # b (stride 1, padding 1) reads a's
    assert codegen.out_pad[by_target["a"]] == [1, 1, 1, 1]
    assert {n.target for n in codegen.prepadded} == {"b"}
    assert {n.target for n in codegen.std_out} == {"e"}  # its output is read by the sum only
    assert codegen.pooled == {}  # dropout between b's ReLU and the pooling


def test_another_input_rank_runs_the_plain_forward(tmp_path):
    model, mask = pruned("lenet300", 28)
    loaded = runtime.load(export_registry(tmp_path, model, mask))
    assert "if v0.dim() != 4" in loaded.compiled.source  # built from the registry spec
    assert "[784, 300, 100], [1, 1, 0], True)" in loaded.compiled.source  # one call, 3 layers
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    assert_close(loaded(x), expected)
    assert_close(loaded(x.flatten(1)), expected)  # [N, 784]: the plain forward
    with pytest.raises(RuntimeError, match="the input has 729 features, the layer takes 784"):
        loaded(torch.randn(2, 1, 27, 27))  # never read past the input
    with pytest.raises(RuntimeError, match=r"the layer takes \[N, 784\]"):
        loaded(torch.randn(2, 700))


class Activations(nn.Module):
    """Sparse Linear layers joined by elementwise activations (module, function with a keyword,
    in place) and by one that is not elementwise (softmax over the features)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 10), nn.Linear(10, 8), nn.Linear(8, 6)
        self.d, self.tanh = nn.Linear(6, 4), nn.Tanh()

    def forward(self, x):
        x = F.gelu(self.b(self.tanh(self.a(x))), approximate="tanh")
        x = F.leaky_relu(self.c(x), 0.2, inplace=True)  # in place: stays standard
        return self.d(x)


def test_elementwise_activations_run_on_the_lanes_layout(tmp_path):
    torch.manual_seed(0)
    model = Activations().eval()
    out = exported(tmp_path, model, ["a.weight", "b.weight", "c.weight", "d.weight"])
    loaded = runtime.load(out, model=Activations(), example=torch.zeros(2, 12), min_speedup=0.0,
                          log=None)
    source = loaded.compiled.source
    assert "approximate='tanh'" in source and ".dim() !=" in source, source
    graph = runtime._Tracer().trace(loaded.net)
    shapes = runtime._shapes(loaded.net, graph, torch.zeros(2, 12))
    codegen = runtime._LanesCodegen(loaded.net, shapes, lambda x: x, 2)
    codegen.plan(list(graph.nodes))
    kinds = {n.name: k for n, k in codegen.kinds.items()}
    assert kinds["tanh"] == "elementwise" and kinds["gelu"] == "elementwise"
    assert "leaky_relu" not in kinds  # in place
    x = torch.randn(5, 12)
    with torch.no_grad():
        expected = model(x)
    assert_close(loaded(x), expected)


def test_a_float64_model_runs_its_chains_in_float64(tmp_path):
    model, mask = pruned("conv2", 8, 0.8)
    model.double()  # pruned places stay exact zeros
    loaded = runtime.load(export_registry(tmp_path, model, mask))
    assert "if v0.dim() != 4" in loaded.compiled.source
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    y = loaded(x)
    assert y.dtype == torch.float64
    assert (y - expected).abs().max().item() <= 1e-12 * expected.abs().max().item()


def test_a_lone_sparse_layer_stays_in_the_standard_layout(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.Softmax(dim=1), nn.Linear(8, 4)).eval()
    out = exported(tmp_path, model, ["0.weight", "2.weight"])
    loaded = runtime.load(out, model=nn.Sequential(nn.Linear(12, 8), nn.Softmax(dim=1),
                                                   nn.Linear(8, 4)), example=torch.zeros(2, 12),
                          log=None)
    assert ".dim() !=" not in loaded.compiled.source  # softmax breaks the chain: no lanes
    x = torch.randn(3, 12)
    with torch.no_grad():
        expected = model(x)
    assert_close(loaded(x), expected)
