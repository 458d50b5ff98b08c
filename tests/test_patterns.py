"""Tests of prunescope.patterns: exact top-k, N:M and block masks, pattern parsing."""

from __future__ import annotations

import math

import pytest
import torch

from prunescope.errors import ConfigError, PruningError
from prunescope.patterns import Pattern, parse_pattern, topk_flat, topk_mask, topk_rows


def stable_topk(flat: torch.Tensor, count: int) -> torch.Tensor:
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, descending=True, stable=True)[:count]] = True
    return keep


# -- topk ------------------------------------------------------------------------------------
def test_topk_flat_equals_a_stable_descending_sort_cut_at_k() -> None:
    generator = torch.Generator().manual_seed(0)
    for trial in range(300):
        size = int(torch.randint(1, 30, (1,), generator=generator))
        flat = torch.randint(-3, 4, (size,), generator=generator).double() if trial % 2 else \
            torch.randn(size, generator=generator, dtype=torch.float64)  # ties, or none
        flat[torch.rand(size, generator=generator) < 0.2] = -math.inf
        count = int(torch.randint(0, size + 1, (1,), generator=generator))
        keep = topk_flat(flat, count)
        assert keep.dtype == torch.bool and int(keep.sum()) == count
        assert torch.equal(keep, stable_topk(flat, count)), (flat.tolist(), count)


def test_topk_ties_go_to_the_lower_index() -> None:
    assert topk_flat(torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0]), 3).tolist() == [
        True, True, False, True, False]
    assert topk_mask(torch.ones(2, 2), 3).tolist() == [[True, True], [True, False]]


@pytest.mark.parametrize("count", [-1, 5])
def test_topk_refuses_impossible_counts(count: int) -> None:
    with pytest.raises(PruningError):
        topk_flat(torch.zeros(4), count)


# -- N:M -------------------------------------------------------------------------------------
def distinct_scores(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(math.prod(shape), generator=generator).double().view(shape)


def test_2_4_on_a_linear_weight_keeps_the_top_2_of_every_4_inputs() -> None:
    scores = distinct_scores(3, 8)  # Linear(8 -> 3)
    keep = parse_pattern("2:4").select("fc.weight", scores, count=0)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    for row in range(3):
        for start in (0, 4):
            group, kept = scores[row, start:start + 4], keep[row, start:start + 4]
            assert int(kept.sum()) == 2
            top2 = set(torch.argsort(group, descending=True)[:2].tolist())
            assert set(torch.nonzero(kept).flatten().tolist()) == top2


def test_2_4_on_a_conv_weight_groups_in_channels_at_each_kernel_position() -> None:
    scores = distinct_scores(2, 8, 3, 3, seed=1)  # Conv2d(8 -> 2, 3x3)
    keep = parse_pattern("2:4").select("conv.weight", scores, count=0)
    for out in range(2):
        for kh in range(3):
            for kw in range(3):
                for start in (0, 4):
                    group = scores[out, start:start + 4, kh, kw]
                    kept = keep[out, start:start + 4, kh, kw]
                    top2 = set(torch.argsort(group, descending=True)[:2].tolist())
                    assert set(torch.nonzero(kept).flatten().tolist()) == top2
    assert keep.float().mean() == 0.5


def test_n_m_ties_go_to_the_lower_index() -> None:
    keep = parse_pattern("1:4").select("w", torch.ones(1, 8), 0)
    assert keep.tolist() == [[True, False, False, False, True, False, False, False]]


@pytest.mark.parametrize("shape", [(3, 6), (2, 6, 3, 3)])
def test_n_m_needs_a_divisible_input_dimension(shape: tuple[int, ...]) -> None:
    with pytest.raises(PruningError, match="multiple of 4"):
        parse_pattern("2:4").select("w", torch.rand(shape), 0)


# -- blocks ----------------------------------------------------------------------------------
BLOCK_SCORES = torch.tensor([
    [9.0, 9.0, 1.0, 1.0],
    [9.0, 9.0, 1.0, 3.0],   # block means: [[9, 1.5],
    [0.0, 0.0, 5.0, 4.0],   #               [0.25, 4.5]]
    [0.0, 1.0, 5.0, 4.0],
])


@pytest.mark.parametrize(
    ("count", "blocks"),
    # round(count / 4) blocks, halves up: 5 -> 1, 6 -> 2, 7 -> 2, 8 -> 2, 10 -> 3, 16 -> 4
    [(0, []), (1, []), (2, [(0, 0)]), (5, [(0, 0)]), (6, [(0, 0), (1, 1)]),
     (8, [(0, 0), (1, 1)]), (10, [(0, 0), (1, 1), (0, 1)]), (16, [(0, 0), (1, 1), (0, 1), (1, 0)])],
)
def test_block_2x2_keeps_whole_blocks_by_mean_score(count: int, blocks: list) -> None:
    keep = parse_pattern("block:2x2").select("w", BLOCK_SCORES, count)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    for r, c in blocks:
        expected[2 * r:2 * r + 2, 2 * c:2 * c + 2] = True
    assert torch.equal(keep, expected)


def test_block_on_a_conv_weight_tiles_out_by_in_times_kernel() -> None:
    scores = torch.zeros(2, 2, 1, 2)  # viewed as [2, 4]
    scores[1, 1, 0, :] = 1.0  # matrix row 1, columns 2 and 3
    keep = parse_pattern("block:1x2").select("conv.weight", scores, 2)
    assert keep.view(2, 4).tolist() == [[False] * 4, [False, False, True, True]]


@pytest.mark.parametrize(("text", "shape"), [("block:2x2", (3, 4)), ("block:1x3", (2, 4))])
def test_block_must_tile_the_matrix(text: str, shape: tuple[int, int]) -> None:
    with pytest.raises(PruningError, match="does not tile"):
        parse_pattern(text).select("w", torch.rand(shape), 4)


# -- parsing ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "pattern", "density"),
    [("unstructured", Pattern("unstructured"), None), (" 2:4 ", Pattern("nm", 2, 4), 0.5),
     ("1:8", Pattern("nm", 1, 8), 0.125), ("block:1x4", Pattern("block", 1, 4), None)],
)
def test_parse_pattern(text: str, pattern: Pattern, density: float | None) -> None:
    assert parse_pattern(text) == pattern
    assert parse_pattern(text).fixed_density == density
    assert str(parse_pattern(text)) == text.strip()


@pytest.mark.parametrize("text", ["3:2", "0:4", "2:2", "block:1x1", "block:0x4", "foo", "2:4:8",
                                  "block:2", ""])
def test_parse_pattern_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_pattern(text)


# -- every output unit kept ------------------------------------------------------------------
def test_topk_rows_keeps_each_rows_best_then_the_highest_scores() -> None:
    scores = torch.tensor([[9.0, 8.0, 7.0], [1.0, 3.0, 2.0], [-math.inf, -math.inf, -math.inf]])
    assert topk_rows(scores, 2).tolist() == [[True, False, False], [False, True, False],
                                             [False, False, False]]
    assert topk_mask(scores, 2).tolist()[1] == [False, False, False]  # what plain top-k does
    assert topk_rows(scores, 3).tolist()[0] == [True, True, False]
    assert torch.equal(topk_rows(scores, 1), topk_mask(scores, 1))  # too few for every row


def test_topk_rows_equals_topk_when_every_row_keeps_a_weight() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        scores = torch.randint(0, 5, (4, 2, 3), generator=generator).double()
        count = int(torch.randint(0, 25, (1,), generator=generator))
        plain = topk_mask(scores, count)
        if plain.flatten(1).any(1).all():
            assert torch.equal(topk_rows(scores, count), plain)
        else:
            kept = topk_rows(scores, count)
            assert kept.count_nonzero() == count
            assert kept.flatten(1).any(1).all() or count < 4


def test_every_row_under_block_keeps_a_block_per_band() -> None:
    scores = torch.cat([torch.full((2, 4), 9.0), torch.full((2, 4), 1.0)])
    pattern = Pattern("block", 2, 2, every_row=True)
    keep = pattern.select("w", scores, 8)
    assert keep[:2].sum() == 4 and keep[2:].sum() == 4
    assert Pattern("block", 2, 2).select("w", scores, 8)[2:].sum() == 0


@pytest.mark.parametrize(("pattern", "min_density", "expected"), [
    (Pattern("unstructured"), None, 6),      # one per row
    (Pattern("unstructured"), 0.0, 0),       # no floor
    (Pattern("unstructured"), 0.25, 12),     # ceil(0.25 * 48) > 6 rows
    (Pattern("unstructured"), 0.05, 6),      # ceil(0.05 * 48) = 3 < 6 rows
    (Pattern("block", 2, 4), None, 24),      # three bands of two rows, one 2x4 block each
    (Pattern("nm", 2, 4), None, 0),          # N:M keeps every row itself
])
def test_floor_counts(pattern: Pattern, min_density, expected: int) -> None:
    assert pattern.floor(torch.zeros(6, 8), min_density) == expected


def test_floor_counts_only_live_rows_and_weights() -> None:
    scores = torch.zeros(3, 4)
    scores[0] = -math.inf
    scores[1, 1:] = -math.inf
    assert Pattern("unstructured").floor(scores, None) == 2
    assert Pattern("unstructured").floor(scores, 0.9) == 5  # capped at the 5 live weights
