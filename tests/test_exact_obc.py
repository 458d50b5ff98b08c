"""Tests of prunescope.second_order.exact_obc: the solver against a brute-force run of the greedy
procedure and against the optimum over all supports, the criterion through ``prune``, and the
refusals (layers too large, block patterns)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from prunescope import prune
from prunescope.errors import PruningError
from prunescope.second_order import OBC, exact_obc, reconstruct
from prunescope.second_order.obc import _damped


def problem(rows: int, cols: int, seed: int, *, mixed: bool = True, samples: int = 64):
    """Random weights ``[rows, cols]`` and ``H = X^T X / N`` (float64) of Gaussian inputs,
    ``mixed`` by a random matrix (correlated) or i.i.d."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, cols, generator=generator, dtype=torch.float64)
    if mixed:
        x = x @ torch.randn(cols, cols, generator=generator, dtype=torch.float64)
    return torch.randn(rows, cols, generator=generator, dtype=torch.float64), x.T @ x / samples


def error(w: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """``sum_rows (w - v)^T H (w - v)``: the layer's output error per calibration example."""
    delta = (w - pruned).double()
    return float(((delta @ hessian) * delta).sum())


def best_on(support: list[int], w: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """The row ``v`` on ``support`` minimising ``(v - w)^T H (v - w)``, solved from scratch."""
    v = torch.zeros_like(w)
    if support:
        index = torch.tensor(support)
        v[index] = torch.linalg.solve(hessian[index][:, index], hessian[index] @ w)
    return v


def removed_in_group(support: list[int], p: int, m: int) -> int:
    start = p - p % m
    return sum(q not in support for q in range(start, start + m))


def greedy_reference(w, hessian, removals, *, every_row=False, nm=None):
    """The greedy procedure written out, with every inverse recomputed from scratch: at each step
    remove, over all rows, the remaining weight of least ``v_p^2 / [(H_SS)^-1]_pp`` (a row's
    last weight only without ``every_row``; under ``nm`` only in groups with room), ``v`` the
    row's optimum on its support ``S``. Returns the final weights and keep-mask."""
    supports = [list(range(w.shape[1])) for _ in range(w.shape[0])]
    current = w.clone()
    for _ in range(removals):
        best = (torch.inf, None, None)
        for r, support in enumerate(supports):
            if every_row and len(support) == 1:
                continue
            inverse = torch.linalg.inv(hessian[support][:, support])
            for i, p in enumerate(support):
                if nm and removed_in_group(support, p, nm[1]) >= nm[1] - nm[0]:
                    continue
                saliency = float(current[r, p] ** 2 / inverse[i, i])
                if saliency < best[0]:
                    best = (saliency, r, p)
        _, r, p = best
        supports[r].remove(p)
        current[r] = best_on(supports[r], w[r], hessian)
    keep = torch.zeros_like(w, dtype=torch.bool)
    for r, support in enumerate(supports):
        keep[r, support] = True
    return current, keep


# -- the solver ------------------------------------------------------------------------------
@pytest.mark.parametrize("every_row", [False, True])
def test_exact_obc_is_the_layer_level_greedy(every_row: bool) -> None:
    w, hessian = problem(4, 6, seed=0)
    w[1] *= 0.05  # its weights go first: without every_row the row empties
    live = torch.ones_like(w, dtype=torch.bool)
    pruned, keep, _ = exact_obc(w, hessian, live=live, keep=5, every_row=every_row,
                                dampening=0.01)
    damped = _damped(hessian, 0.01)
    expected, expected_keep = greedy_reference(w, damped, 24 - 5, every_row=every_row)
    assert torch.equal(keep, expected_keep)
    assert keep[1].any() == every_row
    torch.testing.assert_close(pruned, expected)


def test_exact_obc_under_two_four_is_the_greedy_within_groups() -> None:
    w, hessian = problem(3, 8, seed=1)
    live = torch.ones_like(w, dtype=torch.bool)
    pruned, keep, _ = exact_obc(w, hessian, live=live, nm=(2, 4), dampening=0.01)
    damped = _damped(hessian, 0.01)
    assert torch.all(keep.view(3, 2, 4).sum(2) == 2)
    for r in range(3):  # rows are independent: the greedy of each row alone
        expected, expected_keep = greedy_reference(w[r:r + 1], damped, 4, nm=(2, 4))
        assert torch.equal(keep[r:r + 1], expected_keep)
        torch.testing.assert_close(pruned[r:r + 1], expected)


def test_already_pruned_weights_stay_pruned_and_the_bias_is_corrected() -> None:
    w, _ = problem(3, 5, seed=2)
    live = torch.ones_like(w, dtype=torch.bool)
    live[0, 1] = live[2, 3] = False
    w = torch.where(live, w, 0.0)
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 1
    x = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1)  # the bias's constant input
    with_bias = x.T @ x / 40
    bias = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    pruned, keep, new_bias = exact_obc(w, with_bias, live=live, keep=7, bias=bias)
    assert int(keep.sum()) == 7 and not (keep & ~live).any()
    assert torch.all(pruned[~keep] == 0)
    full = torch.cat([w, bias[:, None]], 1)
    expected = torch.stack([best_on([*keep[r].nonzero().squeeze(1).tolist(), 5], full[r],
                                    _damped(with_bias, 0.01)) for r in range(3)])
    torch.testing.assert_close(torch.cat([pruned, new_bias[:, None]], 1), expected)


def row_optima(w: torch.Tensor, hessian: torch.Tensor, kept: int) -> torch.Tensor:
    """Each row's least error keeping ``kept`` weights, over every support of that size."""
    index = torch.tensor(list(itertools.combinations(range(w.shape[1]), kept)))
    b = (w @ hessian)[:, index]  # [rows, supports, kept]
    solved = torch.linalg.solve(hessian[index[:, :, None], index[:, None, :]], b.permute(1, 2, 0))
    return ((w @ hessian) * w).sum(1) - (b.permute(1, 2, 0) * solved).sum(1).max(0).values


def test_on_8x16_at_half_exact_obc_is_near_the_optimum_on_iid_inputs() -> None:
    ratios = []
    for seed in range(4):
        w, hessian = problem(8, 16, seed, mixed=False)
        live = torch.ones_like(w, dtype=torch.bool)
        per_row, _, _ = exact_obc(w, hessian, live=live, nm=(8, 16), dampening=1e-9)
        ratios.append(error(w, per_row, hessian) / float(row_optima(w, hessian, 8).sum()))
    assert min(ratios) >= 1 - 1e-9
    assert sum(ratios) / len(ratios) < 1.03


@pytest.mark.parametrize("mixed", [False, True])
def test_exact_obc_is_no_worse_than_sparsegpt_on_average(mixed: bool) -> None:
    ratios = []
    for seed in range(6):
        w, hessian = problem(8, 16, seed, mixed=mixed)
        live = torch.ones_like(w, dtype=torch.bool)
        greedy, _, _ = exact_obc(w, hessian, live=live, keep=64)
        column, _, _ = reconstruct(w, hessian, live=live, keep=64)
        ratios.append(error(w, greedy, hessian) / error(w, column, hessian))
    assert sum(ratios) / len(ratios) < 1.0


# -- the criterion ---------------------------------------------------------------------------
def test_obc_prunes_a_model_in_rounds_keeping_the_count(mlp8: nn.Module, batches8) -> None:
    mask = prune(mlp8, "obc", "global", 0.75, batches8, rounds=2)
    assert mask.num_kept == 24
    for name, keep in mask.items():
        assert torch.all(mlp8.get_parameter(name)[~keep] == 0)
        assert keep.any(dim=1).all(), name


def test_a_layer_too_large_is_refused_in_one_line_before_pruning(batches8) -> None:
    model = nn.Sequential(nn.Linear(8, 40), nn.ReLU(), nn.Linear(40, 8))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(PruningError) as caught:
        prune(model, OBC(max_work=8 * 41**3 - 1).criterion(), "global", 0.5, batches8)
    message = str(caught.value)
    assert "\n" not in message and "'2.weight' (8 x 41" in message and "'sparsegpt'" in message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    prune(model, OBC(max_work=8 * 41**3).criterion(), "global", 0.5, batches8)


def test_block_patterns_are_refused_naming_sparsegpt(mlp8: nn.Module, batches8) -> None:
    with pytest.raises(PruningError, match="not block:1x4; use criterion 'sparsegpt'"):
        prune(mlp8, "obc", "global", 0.5, batches8, pattern="block:1x4")
