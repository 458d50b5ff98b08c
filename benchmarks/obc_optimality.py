"""How far from optimal each layer-wise pruning solver is, on small layers where the optimum is
known by enumerating every support.

Random layers ``W`` 8 x 16 (no bias), calibration ``X`` of 64 samples, ``H = X^T X / 64``, 50%
sparsity, 20 seeds; error ``sum_rows (w - v)^T H (w - v)``. Two kinds of inputs: i.i.d.
Gaussian, and Gaussian mixed by a random 16 x 16 matrix (correlated, ill-conditioned). Two ways to
spend the count: 8 of 16 in every row (the solvers' N:M 8:16, magnitude per row), against the sum
of the rows' optima over all C(16, 8) = 12870 supports; and 64 of 128 anywhere in the layer
(``keep=64``, magnitude over the layer), against the layer's optimum (every row's optimum for
every count, combined by dynamic programming). Solvers use their default dampening (1%), so a
ratio can sit a hair below 1 only through that.

Run: .venv/bin/python benchmarks/obc_optimality.py   (about a minute)
"""

from __future__ import annotations

import itertools
import time

import torch

from prunescope.second_order import exact_obc, reconstruct
from prunescope.second_order.obc import _damped, _refit_rows

ROWS, COLS, SAMPLES, SEEDS = 8, 16, 64, 20


def problem(seed: int, correlated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, COLS, generator=generator, dtype=torch.float64)
    if correlated:
        x = x @ torch.randn(COLS, COLS, generator=generator, dtype=torch.float64)
    w = torch.randn(ROWS, COLS, generator=generator, dtype=torch.float64)
    return w, x.T @ x / SAMPLES


def error(w: torch.Tensor, v: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = w - v
    return float(((delta @ hessian) * delta).sum())


def row_optima(w: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``[rows, cols + 1]``: each row's least error keeping k weights, k = 0..cols."""
    base = ((w @ hessian) * w).sum(1)
    best = [base]
    for kept in range(1, COLS + 1):
        index = torch.tensor(list(itertools.combinations(range(COLS), kept)))
        b = (w @ hessian)[:, index].permute(1, 2, 0)  # [supports, kept, rows]
        solved = torch.linalg.solve(hessian[index[:, :, None], index[:, None, :]], b)
        best.append(base - (b * solved).sum(1).max(0).values)
    return torch.stack(best, 1).clamp(min=0)


def layer_optimum(optima: torch.Tensor, kept: int) -> float:
    """Least total error keeping ``kept`` weights over the rows (knapsack over the counts)."""
    table = torch.full((kept + 1,), torch.inf, dtype=torch.float64)
    table[0] = 0.0
    for row in optima:
        table = torch.stack([torch.min(table[:k + 1].flip(0)[:COLS + 1] + row[:k + 1][:COLS + 1])
                             for k in range(kept + 1)])
    return float(table[kept])


def magnitude(w: torch.Tensor, hessian: torch.Tensor, per_row: bool, refit: bool
              ) -> torch.Tensor:
    if per_row:
        keep = torch.zeros_like(w, dtype=torch.bool).scatter_(
            1, w.abs().argsort(1, descending=True)[:, :COLS // 2], True)
    else:
        keep = torch.zeros(w.numel(), dtype=torch.bool)
        keep[w.abs().flatten().argsort(descending=True)[:w.numel() // 2]] = True
        keep = keep.view_as(w)
    return _refit_rows(w, _damped(hessian, 0.01), keep) if refit else w * keep


def solvers(per_row: bool) -> dict:
    count = {"nm": (COLS // 2, COLS)} if per_row else {"keep": ROWS * COLS // 2}
    return {
        "magnitude": lambda w, h: magnitude(w, h, per_row, refit=False),
        "magnitude + least-squares refit": lambda w, h: magnitude(w, h, per_row, refit=True),
        "sparsegpt, column pass only": lambda w, h: reconstruct(
            w, h, live=torch.ones_like(w, dtype=torch.bool), refit=False, **count)[0],
        "sparsegpt (with refit)": lambda w, h: reconstruct(
            w, h, live=torch.ones_like(w, dtype=torch.bool), **count)[0],
        "obc (exact greedy)": lambda w, h: exact_obc(
            w, h, live=torch.ones_like(w, dtype=torch.bool), **count)[0],
    }


def main() -> None:
    start = time.perf_counter()
    ratios: dict[tuple[str, bool, bool], list[float]] = {}
    for correlated in (False, True):
        for seed in range(SEEDS):
            w, hessian = problem(seed, correlated)
            optima = row_optima(w, hessian)
            targets = {True: float(optima[:, COLS // 2].sum()),
                       False: layer_optimum(optima, ROWS * COLS // 2)}
            for per_row, target in targets.items():
                for name, solve in solvers(per_row).items():
                    ratios.setdefault((name, per_row, correlated), []).append(
                        error(w, solve(w, hessian), hessian) / target)
    print(f"mean (max) error / optimum, {ROWS}x{COLS} layers at 50%, X of {SAMPLES} samples, "
          f"{SEEDS} seeds")
    header = ["8 of 16 per row, iid X", "8 of 16 per row, mixed X", "64 anywhere, iid X",
              "64 anywhere, mixed X"]
    print(f"{'method':34s}" + "".join(f"{h:>27s}" for h in header))
    for name in solvers(True):
        cells = []
        for per_row in (True, False):
            for correlated in (False, True):
                values = ratios[name, per_row, correlated]
                cells.append(f"{sum(values) / len(values):.3f} ({max(values):.2f})")
        print(f"{name:34s}" + "".join(f"{c:>27s}" for c in cells))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
