"""Tests of prunescope.kernels.build: the forced and the failed-build fallback (one warning line,
correct results), the cache under concurrent first use, and the run-time self-check."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from prunescope.kernels import SparseConv2d, SparseLinear, build


@pytest.fixture(autouse=True)
def fresh_backend():
    """Each test chooses the backend anew; the next test gets the default one back."""
    build.reset()
    yield
    build.reset()


def check_modules_work() -> None:
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(6, 4)
    mask = torch.rand(4, 6, generator=generator) < 0.5
    x = torch.randn(3, 6, generator=generator)
    assert torch.allclose(SparseLinear.from_dense(linear, mask)(x),
                          nn.functional.linear(x, linear.weight * mask, linear.bias))
    conv = nn.Conv2d(2, 3, 3, padding=1)
    cmask = torch.rand(3, 2, 3, 3, generator=generator) < 0.5
    xc = torch.randn(2, 2, 5, 5, generator=generator)
    assert torch.allclose(SparseConv2d.from_dense(conv, cmask)(xc),
                          nn.functional.conv2d(xc, conv.weight * cmask, conv.bias, padding=1),
                          atol=1e-6)


def one_warning(record) -> str:
    messages = [str(w.message) for w in record if "prunescope.kernels" in str(w.message)]
    assert len(messages) == 1, messages
    assert "\n" not in messages[0]
    return messages[0]


def test_forced_reference_path_warns_once_and_is_correct(monkeypatch):
    monkeypatch.setenv("PRUNESCOPE_KERNELS", "reference")
    with pytest.warns(RuntimeWarning) as record:
        chosen = build.backend()
        build.backend()
        check_modules_work()
    assert chosen.name == "reference" and not chosen.fast
    assert "PRUNESCOPE_KERNELS=reference" in one_warning(record)


def test_unknown_mode_falls_back_with_a_reason(monkeypatch):
    monkeypatch.setenv("PRUNESCOPE_KERNELS", "sse9")
    with pytest.warns(RuntimeWarning, match="'sse9' is not one of"):
        assert build.backend().name == "reference"


def fake_compiler(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-c++"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_failed_build_warns_once_and_modules_still_work(monkeypatch, tmp_path):
    compiler = fake_compiler(tmp_path, 'echo "kern.cpp:1: error: boom" >&2\nexit 1\n')
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning) as record:
        chosen = build.backend()
        check_modules_work()
    message = one_warning(record)
    assert chosen.name == "reference"
    assert "compiling the kernels failed" in message and "error: boom" in message
    assert "(correct, slower)" in message
    log = next((tmp_path / "cache").glob("kernels-*/build.log"))
    assert "boom" in log.read_text()


def test_concurrent_first_builds_compile_once(monkeypatch, tmp_path):
    """Two builders at once: one compiles (under the lock), the other finds the library."""
    calls = tmp_path / "calls"
    compiler = fake_compiler(tmp_path, f"""
case "$1" in --version) echo fake 1.0; exit 0;; esac
echo "$@" >> {calls}
sleep 0.3
for last; do :; done
echo built > "$last"
""")
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache"))
    target = build.library_path()
    results, errors = [], []

    def run():
        try:
            results.append(build.build(target))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [target] * 3
    assert target.read_text() == "built\n"
    invocations = calls.read_text().splitlines()
    assert len(invocations) == len(build.UNITS) + 1  # each unit once, one link
    assert not any("-march=native" in line for line in invocations)
    assert any("-mavx2" in line for line in invocations)
    assert any("-mavx512f" in line for line in invocations)
    assert not list(target.parent.glob(".build-*"))  # the temporary build directory is gone


def test_a_variant_failing_the_self_check_is_not_used(monkeypatch):
    if not build.backend().fast:
        pytest.skip("no fast kernels on this machine")
    build.reset()
    monkeypatch.setattr(build, "_self_check", lambda ops: False)
    with pytest.warns(RuntimeWarning, match="disagree with the reference"):
        assert build.backend().name == "reference"


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_first_use_under_no_grad_or_inference_mode(mode):
    """The backend is chosen on the first call of a sparse layer, and its self-check computes
    gradients: a model's first forward inside ``torch.no_grad`` or ``torch.inference_mode`` (an
    evaluation, a deployed model) still gets the fast kernels and the right result."""
    with mode():
        check_modules_work()
    chosen_inside = build.backend().name
    build.reset()
    check_modules_work()
    assert chosen_inside == build.backend().name  # the same choice as with gradients on


def test_build_command_reports_the_backend():
    env = {**os.environ, "PRUNESCOPE_KERNELS": "reference"}
    done = subprocess.run([sys.executable, "-m", "prunescope.kernels"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0
    assert "reference path (PRUNESCOPE_KERNELS=reference)" in done.stdout
