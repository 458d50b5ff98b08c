"""The benchmarks' shared timing helpers (benchmarks/common.py)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import balanced_orders, interleaved_medians  # noqa: E402


@pytest.mark.parametrize("count", [2, 3, 4, 5, 6])
def test_balanced_orders_put_each_implementation_after_each_other_once_per_cycle(count):
    names = [f"impl{i}" for i in range(count)]
    orders = balanced_orders(names)
    assert orders[0] == names and len(orders) == count - 1
    assert all(sorted(order) == sorted(names) for order in orders)
    calls = [name for order in orders for name in order]
    followed = Counter((calls[i - 1], calls[i]) for i in range(len(calls)))  # cyclic
    assert set(followed) == {(a, b) for a in names for b in names if a != b}
    assert set(followed.values()) == {1}


def test_balanced_orders_of_one_implementation():
    assert balanced_orders(["dense"]) == [["dense"]]


def test_interleaved_medians_time_each_implementation_after_each_other_equally_often():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    medians = interleaved_medians(fns, repeats=5, warmup=1, inner=2)
    assert set(medians) == {"a", "b", "c"} and all(m >= 0 for m in medians.values())
    timed = calls[3:]  # after the warm-up's one round
    assert len(timed) == 6 * 3 * 2  # 5 rounds -> 3 whole cycles of 2 orders, 2 calls a block
    blocks = timed[::2]  # one entry per timed block
    followed = Counter((blocks[i - 1], blocks[i]) for i in range(1, len(blocks)))
    followed[(calls[2], blocks[0])] += 1  # the first block follows the warm-up's last call
    assert set(followed.values()) == {3}  # every ordered pair of names 3 times: once per cycle
