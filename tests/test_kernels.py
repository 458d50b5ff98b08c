"""Tests of prunescope.kernels: every fast path against the reference (forward, input and weight
gradient), every instruction-set variant this CPU runs, gradcheck in float64, the module contract
(state dicts, optimizers), the swap rule and bad input. Build and fallback: test_kernels_build.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunescope.errors import PrunescopeError, PruningError
from prunescope.kernels import (
    KernelError,
    SparseConv2d,
    SparseLinear,
    backend,
    formats,
    reference,
    swap,
    to_dense,
    to_sparse,
)
from prunescope.mask import Mask
from prunescope.sparsifier import MaskHold

RTOL = 1e-5  # relative to the largest reference entry


VARIANTS = ("generic", "avx2", "avx512")  # every instruction-set variant the kernels have


def variants() -> list[str]:
    """The kernel variants this CPU can run (none when only the reference path is available)."""
    chosen = backend()
    if not chosen.fast:
        return []
    names = []
    for name in VARIANTS:
        try:
            chosen.ops.set_variant(name)
        except RuntimeError:
            continue
        names.append(name)
    chosen.ops.set_variant(chosen.name)
    return names


@pytest.fixture(params=VARIANTS)
def variant(request):
    """Run the test with one instruction-set variant forced (skipped if the CPU lacks it)."""
    if request.param not in variants():
        pytest.skip(f"{request.param} kernels not available on this machine")
    ops = backend().ops
    ops.set_variant(request.param)
    yield request.param
    ops.set_variant(backend().name)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    assert actual.shape == expected.shape
    scale = max(expected.abs().max().item(), 1e-30) if expected.numel() else 1.0
    error = (actual - expected).abs().max().item() / scale if expected.numel() else 0.0
    assert error <= rtol, f"relative error {error:.2e} > {rtol:.0e}"


def assert_close_or_same_non_finite(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Finite entries close, the others the same: NaN where NaN, the same signed Infs."""
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite)
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    infinite = torch.isinf(expected)
    assert torch.equal(actual[infinite], expected[infinite])
    assert_close(actual[finite], expected[finite])


def random_mask(shape, density: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator) < density


def pruned_conv(layer: nn.Conv2d, density: float, generator: torch.Generator):
    """A random mask of ``density``, the layer's pruned weights zeroed, and its sparse twin."""
    mask = random_mask(layer.weight.shape, density, generator)
    with torch.no_grad():
        layer.weight.mul_(mask)
    return mask, SparseConv2d.from_dense(layer, mask)


def check_against_reference(layer: nn.Module, sparse: nn.Module, mask: torch.Tensor,
                            x: torch.Tensor, rtol: float = RTOL) -> None:
    """Forward, input gradient, weight gradient (kept entries) and bias gradient agree."""
    dense = layer
    with torch.no_grad():
        dense.weight.mul_(mask)
    x_ref = x.detach().clone().requires_grad_()
    x_sp = x.detach().clone().requires_grad_()
    expected, actual = dense(x_ref), sparse(x_sp)
    assert_close(actual, expected, rtol)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    actual.backward(grad)
    assert_close(x_sp.grad, x_ref.grad, rtol)
    assert_close(sparse.values.grad, dense.weight.grad[mask], rtol)
    if dense.bias is not None:
        assert_close(sparse.bias.grad, dense.bias.grad, rtol)


def check_gradients_asked_for(layer: nn.Module, sparse: nn.Module, mask: torch.Tensor,
                              x: torch.Tensor, grad: torch.Tensor, x_grad: bool, w_grad: bool,
                              b_grad: bool, rtol: float = RTOL) -> torch.Tensor:
    """Only the gradients asked for (input, kept weights, bias) are computed, and each equals
    the dense layer's (its weight already masked). Returns the sparse layer's input."""
    sparse.values.requires_grad_(w_grad)
    sparse.bias.requires_grad_(b_grad)
    x_ref, x_sp = x.clone().requires_grad_(x_grad), x.clone().requires_grad_(x_grad)
    expected, actual = layer(x_ref), sparse(x_sp)
    assert_close(actual, expected, rtol)
    expected.backward(grad)
    actual.backward(grad)
    if x_grad:
        assert_close(x_sp.grad, x_ref.grad, rtol)
    if w_grad:
        assert_close(sparse.values.grad, layer.weight.grad[mask], rtol)
    if b_grad:
        assert_close(sparse.bias.grad, layer.bias.grad, rtol)
    assert (sparse.values.grad is None) != w_grad and (sparse.bias.grad is None) != b_grad
    return x_sp


# -- formats --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,groups", [((5, 7), 1), ((6, 4, 3, 3), 1), ((6, 2, 3, 1), 2)])
def test_compress_round_trip_and_transposed_structure(shape, groups):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator)
    mask = random_mask(shape, 0.4, generator)
    mask[0] = False  # an all-pruned row
    c = formats.compress(weight, mask, groups)
    assert torch.equal(formats.densify(c.values, mask), weight * mask)
    assert c.ptr[0] == 0 and c.ptr[-1] == c.values.numel() and torch.all(c.ptr.diff() >= 0)
    assert c.ptr[1] == 0
    # the transposed structure lists every kept weight once, grouped by input channel
    assert sorted(c.cperm.tolist()) == list(range(c.values.numel()))
    rows = torch.repeat_interleave(torch.arange(shape[0]), c.ptr.diff())
    assert torch.equal(rows[c.cperm.long()], c.crow.long())
    per_channel = shape[1] * groups
    assert c.cptr.numel() == per_channel + 1 and c.cptr[-1] == c.values.numel()


# -- Linear ---------------------------------------------------------------------------------------
LINEAR_CASES = [  # (batch, in, out, density)
    (1, 7, 5, 0.5), (3, 1, 4, 1.0), (17, 40, 33, 0.3), (64, 64, 96, 0.1), (70, 33, 130, 0.05),
    (129, 96, 40, 1.0), (200, 300, 20, 0.02), (5, 16, 16, 0.0),
    (70, 24, 45, 0.3),  # 45 output rows: runs of 16, 16 and 13 (8 transposed, 5 stored one by one)
    (47, 40, 33, 0.3),  # 47 lanes: two 16-lane vectors and a masked tail of 15 (7 on AVX2)
]


@pytest.mark.parametrize("batch,n_in,n_out,density", LINEAR_CASES)
def test_linear_matches_reference(variant, batch, n_in, n_out, density):
    generator = torch.Generator().manual_seed(batch * 1000 + n_in)
    layer = nn.Linear(n_in, n_out)
    mask = random_mask(layer.weight.shape, density, generator)
    if n_out > 2:
        mask[1] = False  # an all-pruned output row
        mask[:, 0] = False  # an all-pruned input column
    sparse = SparseLinear.from_dense(layer, mask)
    check_against_reference(layer, sparse, mask, torch.randn(batch, n_in, generator=generator))


def test_linear_without_bias_and_with_leading_dims(variant):
    generator = torch.Generator().manual_seed(3)
    layer = nn.Linear(12, 9, bias=False)
    mask = random_mask(layer.weight.shape, 0.4, generator)
    sparse = SparseLinear.from_dense(layer, mask)
    check_against_reference(layer, sparse, mask, torch.randn(2, 3, 12, generator=generator))


def _use_threads(threads: int, request) -> None:
    """``torch.set_num_threads(threads)`` for this test, the previous count restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    request.addfinalizer(lambda: torch.set_num_threads(previous))


@pytest.mark.parametrize("n_in,n_out,dtype", [(384, 384, torch.float32),
                                              (384, 1536, torch.float32),
                                              (1536, 384, torch.float32),
                                              (1536, 384, torch.float64),
                                              (16, 16384, torch.float32)])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_transformer_shapes_with_3d_input(variant, n_in, n_out, dtype, threads, request):
    """MiniLM's encoder widths, [batch, tokens, features] input with batch x tokens (69 rows)
    not a multiple of the lane tile, 90% sparse: 1536 input features may be read in column blocks
    (partial sums between them; how many depends on the L2 cache, see the column-blocks test), and
    on 2 threads the output rows are split (at 16-row boundaries) between threads writing the same
    rows. 16 -> 16384 tiles its backward (16384 rows) narrower than its forward (16 rows) on any
    cache (the slab budget is at most 3 MiB): the autograd node keeps its input unpacked and the
    backward packs it; the others may keep the input packed by the forward."""
    _use_threads(threads, request)
    generator = torch.Generator().manual_seed(n_in + n_out)
    layer = nn.Linear(n_in, n_out).to(dtype)
    mask = random_mask(layer.weight.shape, 0.1, generator)
    mask[5] = False
    mask[:, 700:1100] = False  # whole column blocks without taps in some rows
    sparse = SparseLinear.from_dense(layer, mask)
    x = torch.randn(3, 23, n_in, generator=generator, dtype=dtype)
    check_against_reference(layer, sparse, mask, x, rtol=RTOL if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_column_blocks_when_the_weights_fit_in_cache(variant, dtype, threads, request):
    """1536 inputs, 128 outputs, 20% dense (about 39k taps): the slab of 1536 rows x 32 or 64
    lanes (by the L2 cache's size) is read in 4 to 16 column blocks (by its bytes; 8 for float32
    and 16 for float64 on a 1 MiB L2), since the weights (at most 0.5 MB) fit in cache and each
    row keeps at least 16 taps per block (ops.cpp, column_blocks), with whole blocks empty in some
    rows; forward, gradients and the inference path against the reference."""
    _use_threads(threads, request)
    generator = torch.Generator().manual_seed(1536)
    layer = nn.Linear(1536, 128).to(dtype)
    mask = random_mask(layer.weight.shape, 0.2, generator)
    mask[:8, 200:900] = False
    sparse = SparseLinear.from_dense(layer, mask)
    x = torch.randn(70, 1536, generator=generator, dtype=dtype)
    rtol = RTOL if dtype == torch.float32 else 1e-12
    check_against_reference(layer, sparse, mask, x, rtol=rtol)
    with torch.no_grad():
        assert_close(sparse(x), reference.linear(x, sparse.values, sparse.mask, sparse.bias),
                     rtol)


@pytest.mark.parametrize("rows,n_in,n_out,dtype", [(2048, 384, 1536, torch.float32),
                                                   (1000, 1536, 384, torch.float32),
                                                   (70, 33, 130, torch.float32),
                                                   (300, 1536, 384, torch.float64),
                                                   (5, 16, 16, torch.float32)])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_inference_matches_reference(variant, rows, n_in, n_out, dtype, threads, request):
    """Without autograd the forward packs each lane tile in a thread's own buffer (many tiles,
    a remainder tile, column blocks at 1536 inputs) or, with fewer tiles than two per thread,
    takes the packed path; both against the reference, as 3-d input."""
    _use_threads(threads, request)
    generator = torch.Generator().manual_seed(rows + n_in)
    layer = nn.Linear(n_in, n_out).to(dtype)
    mask = random_mask(layer.weight.shape, 0.1, generator)
    mask[3] = False
    sparse = SparseLinear.from_dense(layer, mask)
    x = torch.randn(rows // 5 or 1, 5, n_in, generator=generator, dtype=dtype)
    with torch.no_grad():
        expected = reference.linear(x, sparse.values, sparse.mask, sparse.bias)
        assert_close(sparse(x), expected, RTOL if dtype == torch.float32 else 1e-12)
    assert_close(sparse(x.requires_grad_()).detach(), expected,  # the autograd path, same result
                 RTOL if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("threads", [1, 2])
def test_linear_weights_larger_than_the_slab_budget(variant, threads, request):
    """839k kept weights (3.4 MB, above the slab budget of any L2 up to the 4 MiB the rule
    allows): the permutations into the transposed structure's order and back request their
    random side ahead (ops.cpp, permute_ahead); the gradients still equal the reference."""
    _use_threads(threads, request)
    generator = torch.Generator().manual_seed(14)
    layer = nn.Linear(2048, 2048)
    mask = random_mask(layer.weight.shape, 0.2, generator)
    sparse = SparseLinear.from_dense(layer, mask)
    assert sparse.values.numel() * 4 > 3 << 20
    check_against_reference(layer, sparse, mask, torch.randn(5, 2048, generator=generator))


@pytest.mark.parametrize("threads", [1, 2])
def test_linear_empty_batch(variant, threads, request):
    """No rows: an empty output and input gradient, zero weight and bias gradients (the bias
    gradient is summed while the output gradient is packed, so it must start from zero)."""
    _use_threads(threads, request)
    layer = nn.Linear(300, 200)
    sparse = SparseLinear.from_dense(layer, torch.ones(200, 300, dtype=torch.bool))
    x = torch.randn(0, 300, requires_grad=True)
    y = sparse(x)
    assert y.shape == (0, 200)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert not sparse.values.grad.any() and not sparse.bias.grad.any()


def test_linear_float64_and_non_contiguous_input(variant):
    generator = torch.Generator().manual_seed(4)
    layer = nn.Linear(10, 6).double()
    mask = random_mask(layer.weight.shape, 0.5, generator)
    sparse = SparseLinear.from_dense(layer, mask)
    x = torch.randn(10, 11, dtype=torch.float64, generator=generator).t()  # strided
    check_against_reference(layer, sparse, mask, x, rtol=1e-12)


@pytest.mark.parametrize("x_grad,w_grad,b_grad", [(True, True, True), (False, True, True),
                                                   (True, False, True), (True, True, False),
                                                   (False, False, True)])
@pytest.mark.parametrize("n_in,n_out,threads", [(40, 33, 1), (384, 1536, 1), (384, 1536, 2),
                                                (1536, 384, 2)])
def test_linear_computes_only_the_gradients_asked_for(variant, x_grad, w_grad, b_grad, n_in,
                                                      n_out, threads, request):
    """Both gradients come from one pass over the transposed structure (the fused backward;
    384 -> 1536 in column blocks of the output gradient, with partial sums between them); a first
    layer (no input gradient) takes the weight gradient alone, over the rows, and frozen weights
    the input gradient alone. Each equals the reference, over 70 rows (a remainder tile) and with
    each thread's rows of the transposed structure on 2 threads."""
    _use_threads(threads, request)
    generator = torch.Generator().manual_seed(n_in * n_out)
    layer = nn.Linear(n_in, n_out)
    mask = random_mask(layer.weight.shape, 0.1, generator)
    mask[:, 3] = False  # an input feature without taps: its input gradient is zero
    with torch.no_grad():
        layer.weight.mul_(mask)
    sparse = SparseLinear.from_dense(layer, mask)
    x = torch.randn(70, n_in, generator=generator)
    grad = torch.randn(70, n_out, generator=generator)
    x_sp = check_gradients_asked_for(layer, sparse, mask, x, grad, x_grad, w_grad, b_grad)
    if x_grad:
        assert torch.all(x_sp.grad[:, 3] == 0)


# -- Conv2d ---------------------------------------------------------------------------------------
CONV_CASES = [  # (in, out, kernel, stride, padding, dilation, groups, batch, height, width)
    (3, 4, 3, 1, 1, 1, 1, 2, 7, 6),
    (4, 6, 3, 2, 1, 1, 1, 3, 9, 8),
    (4, 4, (5, 3), (2, 1), (2, 1), 1, 1, 1, 11, 7),
    (4, 6, 3, 1, 2, 2, 2, 2, 8, 9),
    (6, 6, 3, 1, 1, 1, 6, 2, 6, 6),  # depthwise
    (5, 7, 1, 1, 0, 1, 1, 4, 5, 5),
    (4, 4, 3, 1, "same", 2, 1, 2, 7, 7),
    (4, 4, 4, 1, "same", 1, 1, 2, 6, 5),  # asymmetric padding
    (3, 5, 3, 3, 0, 1, 1, 2, 10, 11),
    (3, 2, 2, 2, 3, 1, 1, 1, 4, 4),  # padding wider than the kernel reaches
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_conv2d_matches_reference(variant, case, density):
    c_in, c_out, kernel, stride, padding, dilation, groups, batch, height, width = case
    generator = torch.Generator().manual_seed(c_in * 100 + c_out)
    layer = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups)
    mask = random_mask(layer.weight.shape, density, generator)
    mask[0] = False  # an all-pruned output channel
    sparse = SparseConv2d.from_dense(layer, mask)
    x = torch.randn(batch, c_in, height, width, generator=generator)
    check_against_reference(layer, sparse, mask, x)


# Stride-1 convolutions whose output rows fill their vectors (8 columns or more with at most one
# lane in eight unused, or 16 or more) run directly on the NCHW planes (ops.cpp, direct_conv):
# rows in register blocks, column chunks of 4 vectors, a masked last vector; the cases above
# (narrower, partly filled or strided) run batch innermost.
DIRECT_CASES = [  # (in, out, kernel, padding, dilation, groups, batch, height, width)
    (3, 5, 3, 1, 1, 1, 3, 9, 16),  # one chunk of 2 vectors, rows in blocks of 6 and a rest of 3
    (4, 6, 3, 1, 1, 1, 2, 11, 8),  # one whole vector per row
    (3, 4, 3, 1, 1, 1, 2, 6, 14),  # 14 columns: two vectors, the second masked, 2 lanes unused
    (4, 6, 3, 1, 1, 1, 2, 13, 20),  # a masked last vector
    (4, 4, 3, 0, 1, 1, 2, 10, 18),  # no padding: 16 output columns from 18
    (5, 3, (5, 3), (2, 1), 1, 1, 2, 8, 45),  # two column chunks (4 vectors, then 2 with a mask)
    (4, 6, 3, 2, 2, 2, 1, 7, 33),  # dilation and groups
    (6, 6, 3, 1, 1, 6, 2, 5, 24),  # depthwise
    (5, 7, 1, 0, 1, 1, 3, 4, 17),  # 1 x 1
    (4, 4, 4, "same", 1, 1, 2, 6, 19),  # asymmetric padding
    (3, 4, 3, (3, 2), 1, 1, 1, 3, 16),  # padding wider than the kernel reaches
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", DIRECT_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_conv2d_direct_path_matches_reference(variant, case, density):
    c_in, c_out, kernel, padding, dilation, groups, batch, height, width = case
    generator = torch.Generator().manual_seed(c_in * 100 + width)
    layer = nn.Conv2d(c_in, c_out, kernel, 1, padding, dilation, groups)
    mask = random_mask(layer.weight.shape, density, generator)
    mask[0] = False  # an all-pruned output channel
    sparse = SparseConv2d.from_dense(layer, mask)
    x = torch.randn(batch, c_in, height, width, generator=generator)
    check_against_reference(layer, sparse, mask, x)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv2d_direct_forward_in_parts_of_the_input_channels(variant, threads, dtype, request):
    """64 input channels at 32 columns: a block's input rows (43 KB in float32, 87 KB in
    float64) exceed the L1 budget, so the forward takes the channels in parts (ops.cpp,
    channel_parts: 2 and 4 here), each part adding to the block's stored output; an output channel
    without taps in some parts, and one without any, included."""
    _use_threads(threads, request)
    generator = torch.Generator().manual_seed(64)
    layer = nn.Conv2d(64, 6, 3, padding=1).to(dtype)
    mask = random_mask(layer.weight.shape, 0.5, generator)
    mask[1] = False  # no taps at all
    mask[2, 8:] = False  # taps in the first part only
    mask[3, :40] = False  # taps in the last parts only
    sparse = SparseConv2d.from_dense(layer, mask)
    x = torch.randn(3, 64, 7, 32, generator=generator, dtype=dtype)
    check_against_reference(layer, sparse, mask, x,
                            rtol=RTOL if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv2d_direct_path_on_two_threads(variant, batch, dtype, request):
    """Enough work for both threads: one image's output channels split in two ranges (batch 1),
    or the batch split unevenly (3 images), each thread summing its own weight and bias
    gradients."""
    _use_threads(2, request)
    generator = torch.Generator().manual_seed(batch)
    layer = nn.Conv2d(16, 12, 3, padding=1).to(dtype)
    mask = random_mask(layer.weight.shape, 0.3, generator)
    sparse = SparseConv2d.from_dense(layer, mask)
    x = torch.randn(batch, 16, 20, 40, generator=generator, dtype=dtype)
    check_against_reference(layer, sparse, mask, x,
                            rtol=RTOL if dtype == torch.float32 else 1e-12)


GROUPED_CASES = [  # (stride, width, threads, dtype, x_grad, w_grad, b_grad)
    (1, 12, 1, torch.float32, True, True, True),
    (1, 12, 2, torch.float32, True, True, True),
    (1, 12, 2, torch.float64, True, True, True),
    (1, 12, 2, torch.float32, False, True, True),  # a first layer
    (1, 12, 1, torch.float32, True, False, False),  # frozen weights and bias
    (2, 20, 1, torch.float64, True, True, True),
    (2, 20, 2, torch.float32, True, True, True),
    (2, 20, 2, torch.float32, True, False, True),
]


@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_conv2d_batch_innermost_in_groups_of_images(variant, case, request):
    """256 input channels make the batch-innermost path (rows of 12 columns, which leave a
    quarter of their vectors unused, or strided) compute 21 images in several groups, the last
    one smaller (groups_of in ops.cpp takes an even number of images here, 6 to 16 by the L2 size
    it reads, within 4 MiB): on one thread, and on two, each thread taking whole groups and
    summing its own weight and bias gradients.
    Only the gradients asked for are computed, and they equal the reference."""
    stride, width, threads, dtype, x_grad, w_grad, b_grad = case
    _use_threads(threads, request)
    generator = torch.Generator().manual_seed(stride * 100 + threads)
    layer = nn.Conv2d(256, 8, 3, stride, padding=1).to(dtype)
    mask = random_mask(layer.weight.shape, 0.1, generator)
    mask[1] = False  # an all-pruned output channel
    with torch.no_grad():
        layer.weight.mul_(mask)
    sparse = SparseConv2d.from_dense(layer, mask)
    x = torch.randn(21, 256, width, width, generator=generator, dtype=dtype)
    side = (width - 1) // stride + 1  # 3 x 3, padding 1
    grad = torch.randn(21, 8, side, side, generator=generator, dtype=dtype)
    check_gradients_asked_for(layer, sparse, mask, x, grad, x_grad, w_grad, b_grad,
                              RTOL if dtype == torch.float32 else 1e-12)


def test_conv2d_direct_path_never_reads_past_a_row(variant):
    """A row of 20 columns ends in a vector of which 4 lanes are the row's: the other 4 read the
    next columns (here an Inf in the last input column). The taps of the kernel's first column never
    read the last input column, so their weight gradient, and every output that does not, stay
    finite and equal the reference."""
    generator = torch.Generator().manual_seed(20)
    layer = nn.Conv2d(2, 3, 3, padding=1)
    mask = torch.ones(layer.weight.shape, dtype=torch.bool)
    sparse = SparseConv2d.from_dense(layer, mask)
    x = torch.randn(2, 2, 6, 20, generator=generator)
    x[..., -1] = float("inf")
    x_ref, x_sp = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, actual = layer(x_ref), sparse(x_sp)
    grad = torch.randn(expected.shape, generator=generator)
    expected.backward(grad)
    actual.backward(grad)
    assert_close(actual[..., :-2], expected[..., :-2])
    first_column = formats.densify(sparse.values.grad, sparse.mask)[..., 0]
    assert torch.isfinite(first_column).all()
    assert_close(first_column, layer.weight.grad[..., 0])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("where", ["input", "output gradient", "both"])
@pytest.mark.parametrize("first_layer", [False, True])
def test_conv2d_direct_backward_with_a_value_not_finite(variant, threads, where, first_layer,
                                                        request):
    """Both gradients come from one pass whose products include input positions that the
    reference never multiplies (an Inf there would make NaN of a finite sum): an image whose input
    is not finite gets its weight gradient the other way, and the batch's other images keep the
    one pass, so the sum over both equals the reference, Infs included. Like the reference,
    neither way multiplies the output gradient with the input's zero padding: an Inf in the output
    gradient gives the reference's Infs, not NaN, also in the image whose input is not finite
    ("both"). A first layer (no input gradient) takes the same pass without the input gradient."""
    _use_threads(threads, request)
    generator = torch.Generator().manual_seed(31)
    layer = nn.Conv2d(8, 6, 3, padding=1)
    mask, sparse = pruned_conv(layer, 0.5, generator)
    x = torch.randn(4, 8, 20, 24, generator=generator)
    if where in ("input", "both"):
        x[2, 3, 0, 23] = float("inf")  # a corner: most taps never reach it
    x_ref = x.clone().requires_grad_(not first_layer)
    x_sp = x.clone().requires_grad_(not first_layer)
    expected, actual = layer(x_ref), sparse(x_sp)
    grad = torch.randn(expected.shape, generator=generator)
    if where != "input":  # beside the padding: some taps meet it there only
        grad[2 if where == "both" else 1, 2, 0, 0] = float("inf")
    expected.backward(grad)
    actual.backward(grad)
    weight_grad = formats.densify(sparse.values.grad, sparse.mask)
    reference = torch.where(mask, layer.weight.grad, 0.0)
    finite = torch.isfinite(reference)
    assert finite.sum() > finite.numel() // 4 and not finite.all()
    assert_close_or_same_non_finite(weight_grad, reference)
    assert_close_or_same_non_finite(sparse.bias.grad, layer.bias.grad)
    if first_layer:
        assert x_sp.grad is None
        return
    # the input gradient: where the reference's is finite, the same; beside the Inf the
    # reference's pruned zeros make NaN (0 * Inf) of what the kept taps alone make finite or Inf
    finite_dx = torch.isfinite(x_ref.grad)
    assert (where == "input") == bool(finite_dx.all())
    assert torch.isfinite(x_sp.grad[finite_dx]).all()
    assert_close(x_sp.grad[finite_dx], x_ref.grad[finite_dx])


@pytest.mark.parametrize("x_grad,w_grad,b_grad", [(False, True, True), (True, False, True),
                                                   (True, True, False), (False, False, True)])
def test_conv2d_direct_path_computes_only_the_gradients_asked_for(variant, x_grad, w_grad,
                                                                  b_grad):
    """A first layer (no input gradient), frozen weights or bias: the others still equal the
    reference."""
    generator = torch.Generator().manual_seed(17)
    layer = nn.Conv2d(3, 4, 3, padding=1)
    mask, sparse = pruned_conv(layer, 0.5, generator)
    x = torch.randn(2, 3, 5, 17, generator=generator)
    grad = torch.randn(2, 4, 5, 17, generator=generator)
    check_gradients_asked_for(layer, sparse, mask, x, grad, x_grad, w_grad, b_grad)


@pytest.mark.parametrize("width", [6, 20])
def test_conv2d_empty_batch(variant, width):
    """No images, on either path: empty outputs and input gradient, zero weight and bias
    gradients."""
    layer = nn.Conv2d(3, 4, 3, padding=1)
    sparse = SparseConv2d.from_dense(layer, torch.ones(4, 3, 3, 3, dtype=torch.bool))
    x = torch.randn(0, 3, 8, width, requires_grad=True)
    y = sparse(x)
    assert y.shape == (0, 4, 8, width)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert not sparse.values.grad.any() and not sparse.bias.grad.any()


def test_conv2d_unbatched_input_and_no_bias(variant):
    generator = torch.Generator().manual_seed(5)
    layer = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    mask = random_mask(layer.weight.shape, 0.5, generator)
    sparse = SparseConv2d.from_dense(layer, mask)
    check_against_reference(layer, sparse, mask, torch.randn(3, 5, 5, generator=generator))


def test_gradcheck_float64():
    generator = torch.Generator().manual_seed(6)
    linear = SparseLinear.from_dense(nn.Linear(5, 4).double(), random_mask((4, 5), 0.6, generator))
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: _call(linear, x, v, b),
                                    (x, linear.values, linear.bias))
    conv = SparseConv2d.from_dense(nn.Conv2d(2, 3, 3, stride=2, padding=1).double(),
                                   random_mask((3, 2, 3, 3), 0.6, generator))
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: _call(conv, x, v, b),
                                    (x, conv.values, conv.bias))


def test_double_backward_is_refused_not_wrong():
    if not backend().fast:
        pytest.skip("no fast kernels on this machine")
    sparse = SparseLinear.from_dense(nn.Linear(4, 3), torch.ones(3, 4, dtype=torch.bool))
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(sparse(x).sum(), x, create_graph=True)


def _call(layer, x, values, bias):
    """Call ``layer`` with ``values``/``bias`` swapped in, so gradcheck can perturb them."""
    saved = layer.values, layer.bias
    layer._parameters["values"], layer._parameters["bias"] = values, bias
    try:
        return layer(x)
    finally:
        layer._parameters["values"], layer._parameters["bias"] = saved


# -- the module contract --------------------------------------------------------------------------
def lenet_like() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 3))


def model_mask(model: nn.Module, density: float = 0.3) -> Mask:
    generator = torch.Generator().manual_seed(1)
    return Mask({n: random_mask(p.shape, density, generator)
                 for n, p in model.named_parameters() if n.endswith("weight")})


def force_all(model: nn.Module, mask: Mask) -> swap.SwapPlan:
    return to_sparse(model, mask, torch.randn(2, 1, 6, 6), min_speedup=0.0, verbose=False)


def test_state_dict_has_dense_keys_and_round_trips():
    dense = lenet_like()
    mask = model_mask(dense)
    mask.apply_(dense)
    sparse = lenet_like()
    force_all(sparse, mask)
    assert all(isinstance(sparse[i], (SparseConv2d, SparseLinear)) for i in (0, 3, 5))
    sparse.load_state_dict(dense.state_dict())  # dense -> sparse
    state = sparse.state_dict()
    assert state.keys() == dense.state_dict().keys()
    fresh = lenet_like()
    fresh.load_state_dict(state)  # sparse -> dense
    for key, value in dense.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    x = torch.randn(4, 1, 6, 6)
    assert_close(sparse(x), dense(x))


def test_loading_weights_outside_the_mask_is_an_error():
    dense = lenet_like()
    mask = model_mask(dense)
    sparse = lenet_like()
    force_all(sparse, mask)
    with pytest.raises(RuntimeError, match="non-zero weights where the sparse layer's mask"):
        sparse.load_state_dict(dense.state_dict())  # dense was never pruned


def test_training_matches_dense_training_with_the_mask_held():
    """SGD with momentum and weight decay: sparse layers follow the masked dense run."""
    dense = lenet_like()
    mask = model_mask(dense)
    sparse = lenet_like()
    force_all(sparse, mask)
    hold = MaskHold(mask)
    hold.mask.apply_(dense)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
                  for m in (dense, sparse)]
    generator = torch.Generator().manual_seed(2)
    for step in range(4):
        x, y = torch.randn(8, 1, 6, 6, generator=generator), torch.randint(0, 3, (8,),
                                                                            generator=generator)
        for model, optimizer in zip((dense, sparse), optimizers, strict=True):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if model is dense:
                hold.before_optimizer_step(model, step)
            optimizer.step()
            if model is dense:
                hold.after_optimizer_step(model, step)
    for key, value in dense.state_dict().items():
        assert_close(sparse.state_dict()[key], value, rtol=1e-5)


def test_to_dense_restores_plain_layers_and_returns_the_mask():
    model = lenet_like()
    mask = model_mask(model)
    mask.apply_(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    force_all(model, mask)
    back = to_dense(model)
    assert back.equal(mask)
    assert [type(m) for m in model] == [type(m) for m in lenet_like()]
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value)


def test_bfloat16_runs_the_reference_path():
    generator = torch.Generator().manual_seed(7)
    layer = nn.Linear(8, 4).to(torch.bfloat16)
    mask = random_mask((4, 8), 0.5, generator)
    sparse = SparseLinear.from_dense(layer, mask)
    x = torch.randn(3, 8, generator=generator).to(torch.bfloat16)
    expected = reference.linear(x, sparse.values, sparse.mask, sparse.bias)
    assert torch.equal(sparse(x), expected)


# -- the swap rule --------------------------------------------------------------------------------
def test_swap_rule_follows_the_measurement(monkeypatch):
    model = lenet_like()
    mask = model_mask(model)
    timings = {0: (1.0, 0.5), 3: (1.0, 0.95), 5: (1.0, 2.0)}  # dense ms, sparse ms per layer

    def fake(layer, kind, keep, input_shape, input_grad, training, repeats):
        index = next(i for i, m in enumerate(model) if m is layer)
        return timings[index]

    monkeypatch.setattr(swap, "_time_pair", fake)
    lines = []
    plan = to_sparse(model, mask, torch.randn(2, 1, 6, 6), log=lines.append)
    assert plan.swapped == ["0"]  # 2x: swapped; 1.05x: under min_speedup; 0.5x: slower
    assert isinstance(model[0], SparseConv2d) and isinstance(model[3], nn.Linear)
    assert set(plan.residual) == {"3.weight", "5.weight"}
    assert "sparse (faster)" in lines[0] and "dense (not 1.1x faster)" in lines[0]


def test_timing_takes_the_more_cautious_of_fastest_runs_and_paired_ratios(monkeypatch):
    """One lucky sparse run cannot win the swap: the per-round ratios' median counts too, and
    the order within a round alternates."""
    clock = [0.0]
    order = []
    durations = {"dense": iter([1, 1] + [10] * 5), "sparse": iter([1, 1, 1] + [20] * 4)}

    def run(name):
        def call():
            order.append(name)
            clock[0] += next(durations[name])
        return call

    monkeypatch.setattr(swap.time, "perf_counter", lambda: clock[0] / 1e3)
    times = swap._interleaved({"dense": run("dense"), "sparse": run("sparse")}, 5)
    # fastest runs: 10 vs 1 (10x); rounds: 10/1, 10/20, 10/20, 10/20, 10/20 (median 0.5x)
    assert times == pytest.approx({"dense": 10.0, "sparse": 20.0})
    assert order[4:8] == ["dense", "sparse", "sparse", "dense"]
    durations = {"dense": iter([1, 1] + [10] * 5), "sparse": iter([1, 1] + [4, 6, 5, 5, 5])}
    assert swap._interleaved({"dense": run("dense"), "sparse": run("sparse")}, 5) == \
        pytest.approx({"dense": 10.0, "sparse": 5.0})  # fastest 2.5x, paired median 2x: 2x


def test_swap_rule_never_makes_a_synthetic_model_slower(request):
    """Measured for real: a 99%-sparse layer is swapped, an unpruned one (where the dense
    product wins by a wide margin) is not."""
    if not backend().fast:
        pytest.skip("no fast kernels on this machine")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: timings stay meaningful on a busy shared machine
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    mask = Mask({"0.weight": torch.rand(512, 512) < 0.01,
                 "2.weight": torch.ones(512, 512, dtype=torch.bool)})
    plan = to_sparse(model, mask, torch.randn(64, 512), verbose=False)
    assert plan.swapped == ["0"]
    for choice in plan.layers:
        assert choice.sparse == (choice.sparse_ms * 1.1 <= choice.dense_ms)


def test_training_times_the_dense_layer_with_its_mask_hold(monkeypatch):
    """Kept dense, a pruned layer is also masked every step: the timing includes that."""
    held = []
    zero_grads = Mask.zero_grads_
    monkeypatch.setattr(Mask, "zero_grads_",
                        lambda self, params: held.append(list(params)) or zero_grads(self, params))
    model = nn.Sequential(nn.Linear(16, 8))
    mask = Mask({"0.weight": torch.rand(8, 16) < 0.5})
    to_sparse(model, mask, torch.randn(4, 16), repeats=2, verbose=False)
    assert held and all(names == ["weight"] for names in held)
    held.clear()
    to_sparse(model, mask, torch.randn(4, 16), training=False, repeats=2, verbose=False)
    assert not held


def test_swap_without_example_times_linear_layers_only(monkeypatch):
    monkeypatch.setattr(swap, "_time_pair", lambda *args: (1.0, 0.1))
    model = lenet_like()
    plan = to_sparse(model, model_mask(model), verbose=False)
    assert plan.swapped == ["3", "5"]
    assert "give example=" in plan.layers[0].reason


def test_inference_mode_and_repeated_swaps(monkeypatch):
    monkeypatch.setattr(swap, "_time_pair", lambda *args: (1.0, 0.1))
    model = lenet_like()
    mask = model_mask(model)
    to_sparse(model, mask, torch.randn(2, 1, 6, 6), verbose=False)
    plan = to_sparse(model, mask, torch.randn(5, 1, 6, 6), training=False, verbose=False)
    assert plan.swapped == ["0", "3", "5"] and plan.residual is None
    assert "inference" in plan.table()


# -- bad input ------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error():
    layer = nn.Linear(4, 3)
    with pytest.raises(KernelError, match="mask has shape"):
        SparseLinear.from_dense(layer, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(KernelError, match="bool tensor"):
        SparseLinear.from_dense(layer, torch.ones(3, 4))
    sparse = SparseLinear.from_dense(layer, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(KernelError, match="float64 input but holds torch.float32"):
        sparse(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(KernelError, match="expects 4 input features"):
        sparse(torch.randn(2, 5))
    reflect = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    with pytest.raises(KernelError, match="padding_mode='reflect'"):
        SparseConv2d.from_dense(reflect, torch.ones(2, 2, 3, 3, dtype=torch.bool))
    conv = SparseConv2d.from_dense(nn.Conv2d(2, 2, 3), torch.ones(2, 2, 3, 3, dtype=torch.bool))
    with pytest.raises(KernelError, match=r"expects \[N, 2, H, W\]"):
        conv(torch.randn(1, 3, 5, 5))
    assert issubclass(KernelError, PrunescopeError)


def test_to_sparse_refuses_a_mask_that_does_not_fit_and_explains_dense_layers():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 3))
    with pytest.raises(PruningError, match="shape"):
        to_sparse(model, Mask({"2.weight": torch.ones(3, 3, dtype=torch.bool)}), verbose=False)
    mask = Mask({"0.weight": torch.ones(2, 2, 3, 3, dtype=torch.bool),
                 "2.bias": torch.ones(3, dtype=torch.bool)})
    plan = to_sparse(model, mask, torch.randn(1, 2, 4, 4), verbose=False)
    assert plan.swapped == []
    reasons = [c.reason for c in plan.layers]
    assert "padding_mode='reflect'" in reasons[0]
    assert "no sparse kernel for Linear.bias" in reasons[1]


def test_to_sparse_leaves_unsupported_layers_dtypes_and_devices_dense():
    model = nn.Sequential(nn.Linear(8, 4).half(), nn.Linear(4, 4, device="meta"),
                          nn.Conv1d(4, 4, 1))
    mask = Mask({"0.weight": torch.ones(4, 8, dtype=torch.bool),
                 "1.weight": torch.ones(4, 4, dtype=torch.bool),
                 "2.weight": torch.ones(4, 4, 1, dtype=torch.bool)})
    plan = to_sparse(model, mask, verbose=False)
    assert plan.swapped == []
    reasons = [c.reason for c in plan.layers]
    assert "not torch.float16 on cpu" in reasons[0] and "on meta" in reasons[1]
    assert "no sparse kernel for Conv1d.weight" in reasons[2]



@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Linear(16, 16384), (70, 16)),  # widening: the input itself kept for backward
    (lambda: nn.Linear(64, 64), (70, 64)),  # the input packed by the forward
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 8, 20)),  # direct path: the input itself
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 8, 6)),  # batch innermost: a packed copy
])
def test_input_changed_in_place_after_forward_is_never_a_silent_wrong_gradient(variant, make,
                                                                              shape):
    """Changing the layer's input in place between forward and backward either raises autograd's
    error (where the kernels kept the input itself, as nn.Linear and nn.Conv2d do) or leaves the
    gradients those of the input the forward saw (where they kept a packed copy); never
    gradients of the changed input."""
    generator = torch.Generator().manual_seed(11)
    layer = make()
    mask = random_mask(layer.weight.shape, 0.5, generator)
    sparse = (SparseLinear if isinstance(layer, nn.Linear) else SparseConv2d).from_dense(layer,
                                                                                         mask)
    x = torch.randn(shape, generator=generator)
    sparse(x.clone()).sum().backward()
    expected = sparse.values.grad.clone()
    sparse.values.grad = None
    h = x.clone()
    y = sparse(h)
    h.mul_(2)
    try:
        y.sum().backward()
    except RuntimeError as error:
        assert "modified by an inplace operation" in str(error)
        return
    assert_close(sparse.values.grad, expected, RTOL)


def test_linear_bias_gradient_over_many_rows_is_as_accurate_as_torch(variant):
    """The bias gradient, summed while the output gradient is packed, over 200000 rows of
    positive float32 gradients: within a few units of float32 rounding of the float64 sum (as
    torch's own sum is; summing the tiles' float32 sums in order was 1.5e-6 off)."""
    generator = torch.Generator().manual_seed(12)
    layer = nn.Linear(3, 10)
    sparse = SparseLinear.from_dense(layer, torch.ones(10, 3, dtype=torch.bool))
    x = torch.randn(200_000, 3, generator=generator)
    grad = 1 + torch.rand(200_000, 10, generator=generator)
    sparse(x).backward(grad)
    expected = grad.double().sum(0)
    assert ((sparse.bias.grad.double() - expected).abs() / expected).max() < 3e-7


@pytest.mark.parametrize("n_in,n_out", [(16, 16384), (64, 64)])
def test_linear_with_frozen_weights_keeps_no_input(variant, n_in, n_out):
    """Frozen weights need no weight gradient, so the layer keeps no input, as nn.Linear keeps
    none: changing the input in place before the backward is no error, and the input and bias
    gradients equal nn.Linear's."""
    generator = torch.Generator().manual_seed(13)
    layer = nn.Linear(n_in, n_out)
    mask = random_mask(layer.weight.shape, 0.5, generator)
    with torch.no_grad():
        layer.weight.mul_(mask)
    layer.weight.requires_grad_(False)
    sparse = SparseLinear.from_dense(layer, mask)
    sparse.values.requires_grad_(False)
    x = torch.randn(70, n_in, generator=generator)
    grad = torch.randn(70, n_out, generator=generator)
    grads = []
    for module in (layer, sparse):
        h = x.clone().requires_grad_()
        inner = h * 1.0
        y = module(inner)
        inner.mul_(2)
        y.backward(grad)
        grads.append((h.grad, module.bias.grad))
    for got, expected in zip(grads[1], grads[0], strict=True):
        assert_close(got, expected, RTOL)
