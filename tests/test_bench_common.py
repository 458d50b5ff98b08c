"""The benchmarks' shared timing helpers (benchmarks/common.py)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import balanced_orders  # noqa: E402


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
