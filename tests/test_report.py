"""The report: self-contained HTML from an audit dictionary, re-rendered without torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_audit_fixtures import synthetic_audit

from prunescope.report import ReportError, load_audit, render, rerender


@pytest.fixture(scope="module")
def audit() -> dict:
    return json.loads(json.dumps(synthetic_audit()))  # as read back from audit.json


def test_report_is_self_contained(audit):
    html = render(audit)
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "<script" not in html.lower()
    sources = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"https?://", html)


def test_report_has_headline_figures_and_tables(audit):
    html = render(audit)
    for heading in ("Headline", "Figures", "Worst classes and groups", "Risk before pruning",
                    "Sparsity and cost", "Every population"):
        assert f"<h2>{heading}</h2>" in html
    assert html.index("Headline") < html.index("Figures") < html.index("Worst classes")
    assert len(re.findall(r"<img src='data:image/png", html)) >= 5
    assert html.count("<figcaption>") == html.count("<img ")
    focus = audit["populations"][1]
    assert f"CIEs <b>{focus['cie']['count']}</b>" in html
    assert "blue" in html and "orange" in html and "Bias amplification" in html


def test_report_escapes_names(audit):
    hostile = json.loads(json.dumps(audit))
    hostile["dataset"]["name"] = "<b>x</b>"
    hostile["dataset"]["classes"] = ["<i>no</i>", "yes"]
    html = render(hostile)
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    assert "<i>no</i>" not in html


def test_rerender_writes_beside_the_json_and_refuses_other_versions(audit, tmp_path):
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(audit))
    assert rerender(path) == tmp_path / "report.html"
    assert (tmp_path / "report.html").stat().st_size > 10_000
    path.write_text(json.dumps({**audit, "version": "prunescope.audit/999"}))
    with pytest.raises(ReportError, match="re-run `prunescope audit`"):
        load_audit(path)
    with pytest.raises(ReportError, match="no such audit file"):
        load_audit(tmp_path / "missing.json")


def test_an_audit_of_the_right_version_with_missing_parts_is_one_line(tmp_path):
    path = tmp_path / "audit.json"
    path.write_text(json.dumps({"version": "prunescope.audit/1"}))
    with pytest.raises(ReportError, match="incomplete or malformed") as exc:
        rerender(path)
    assert "\n" not in str(exc.value) and not (tmp_path / "report.html").exists()


def test_a_failed_render_leaves_no_audit_files(audit, tmp_path, monkeypatch):
    from prunescope.audit import audit as audit_module

    broken = {**audit, "populations": "not a list"}
    with pytest.raises(ReportError):
        audit_module.write(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


POISON = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("torch was importable")
from prunescope.cli import main
code = main(["report", sys.argv[1]])
assert not any(name == "torch" or name.startswith("torch.") for name in sys.modules
               if sys.modules[name] is not None), "torch got imported"
raise SystemExit(code)
"""


def test_prunescope_report_runs_without_torch(audit, tmp_path):
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(audit))
    done = subprocess.run([sys.executable, "-c", POISON, str(path)], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")
