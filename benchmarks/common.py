"""Shared timing helpers for the benchmarks: medians over repeats after warm-up."""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def median_ms(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int, *, warmup: int = 2,
                      inner: int = 1) -> dict[str, list[float]]:
    """Ms per call of each function in each round, one timed block of ``inner`` calls of each per
    round; ``rounds`` is rounded up to whole cycles of :func:`balanced_orders`. Machine drift
    (other processes, frequency changes) hits every implementation alike, and each runs directly
    after each other one equally often, so none is timed more often in the caches a slower one
    left behind. The warm-up plays the cycle's last order, so the first timed round follows it as
    every later cycle does."""
    orders = balanced_orders(list(fns))
    for _ in range(warmup):
        for name in orders[-1]:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(-(-rounds // len(orders)) * len(orders)):
        for name in orders[r % len(orders)]:
            start = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            times[name].append((time.perf_counter() - start) * 1e3 / inner)
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]], *, repeats: int = 15,
                        warmup: int = 2, inner: int = 1) -> dict[str, float]:
    """Median ms per call of each function over :func:`interleaved_times`' rounds."""
    times = interleaved_times(fns, repeats, warmup=warmup, inner=inner)
    return {name: statistics.median(values) for name, values in times.items()}


def balanced_orders(names: list[str]) -> list[list[str]]:
    """Orders for rounds of one call each, ``len(names) - 1`` of them (the first ``names`` itself),
    that played one after another and over again put every name directly after every other name
    exactly once per cycle, and never after itself. A call's speed depends on the caches the call
    before it left (a dense layer's backward evicts much of what a sparse one reuses), so each
    implementation must follow each other equally often: a plain rotation of three names puts the
    second one after the first in two rounds of three, the third in one. Found by a depth-first
    search over permutations (instant for the handful of implementations a benchmark compares)."""
    if len(names) <= 1:
        return [list(names)]
    orders, used = [list(names)], set(itertools.pairwise(names))

    def extend() -> bool:
        if len(orders) == len(names) - 1:
            return (orders[-1][-1], names[0]) not in used
        for order in itertools.permutations(names):
            edges = list(itertools.pairwise([orders[-1][-1], *order]))
            if any(a == b or (a, b) in used for a, b in edges) or len(set(edges)) < len(edges):
                continue
            orders.append(list(order))
            used.update(edges)
            if extend():
                return True
            orders.pop()
            used.difference_update(edges)
        return False

    if not extend():  # not reached for 2 to 6 names (checked)
        raise ValueError(f"no balanced order of {len(names)} implementations")
    return orders


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "processor": platform.processor() or "unknown"}


def write_results(name: str, records: list[dict]) -> Path:
    """Write ``bench/results/<name>.json`` (records plus the machine) and return its path."""
    from prunescope.files import write_json

    path = RESULTS / f"{name}.json"
    write_json(path, {"machine": machine(), "records": records})
    return path


def print_checks(results: list[dict]) -> None:
    """One ``[x]`` / ``[ ]`` line per target: ``what``, ``met``, ``measured``."""
    for check in results:
        print(f"[{'x' if check['met'] else ' '}] {check['what']}: {check['measured']:.2f}")


def finish(start: float) -> tuple[tuple[float, float, float], float]:
    """Print the load average and the seconds since ``start`` (``time.perf_counter()``);
    return both."""
    load, seconds = os.getloadavg(), time.perf_counter() - start
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {seconds:.0f} s")
    return load, seconds


def write_json_file(path: Path, obj: object) -> Path:
    """Write ``obj`` as JSON to ``path`` (atomically) and return the path."""
    from prunescope.files import write_json

    write_json(path, obj)
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """Rows as a markdown table, floats with 3 significant digits."""
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def dumps(obj: object) -> str:
    return json.dumps(obj, indent=2)
