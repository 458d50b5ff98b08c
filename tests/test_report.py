"""The report: self-contained HTML from the typed audit result, re-rendered without torch; the
result's JSON round trip and version lines; a metric added in one place."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_audit_fixtures import synthetic_audit

from prunescope.audit.schema import (
    VERSION,
    AuditFileError,
    AuditResult,
    BiasAmplification,
    GroupMetric,
    Intervals,
    RiskScore,
    RocCurve,
)
from prunescope.report import ReportError, load_audit, render, rerender


@pytest.fixture(scope="module")
def audit() -> AuditResult:
    return AuditResult.from_json(synthetic_audit().to_json())  # as read back from audit.json


def test_the_typed_result_round_trips_exactly_through_json(audit):
    result = synthetic_audit()
    back = AuditResult.from_json(result.to_json())
    assert back == result and back.to_json() == result.to_json()
    assert back.version == VERSION and back.populations[1].welch[0].test == "welch"
    assert back.populations[1].cie.positions == result.populations[1].cie.positions


def test_disaggregation_risk_and_bias_amplification_are_typed_and_round_trip(audit):
    focus = audit.populations[1]
    assert isinstance(focus.by_class["accuracy"], GroupMetric)
    assert isinstance(focus.by_group["false_positive_rate"].ci, Intervals)
    assert isinstance(focus.bias_amplification["yes"], BiasAmplification)
    assert len(focus.bias_amplification["yes"].per_model) == focus.k
    margin = focus.risk.cie["margin"]
    assert isinstance(margin, RiskScore) and isinstance(margin.roc, RocCurve)
    assert margin.positives == focus.cie.count
    assert set(focus.risk.flip) == set(audit.risk_signals)
    assert AuditResult.from_json(audit.to_json()) == audit


def test_a_field_that_may_be_absent_stays_absent_in_the_json():
    result = synthetic_audit(n_boot=0)  # no bootstrap: no intervals
    result.dense.bias_amplification["yes"] = BiasAmplification(None, reason="too few")
    data = json.loads(result.to_json())
    assert "ci" not in data["dense"]["by_class"]["accuracy"]
    assert data["dense"]["bias_amplification"]["yes"] == {"value": None, "reason": "too few"}
    back = AuditResult.from_json(result.to_json())
    assert back == result and back.dense.by_class["accuracy"].ci is None
    assert back.dense.bias_amplification["yes"].per_model is None


def test_the_page_reads_the_typed_result_not_its_json_form(audit, monkeypatch):
    expected = render(audit)

    def refuse(self):
        raise AssertionError("the report read the dict form")

    monkeypatch.setattr(AuditResult, "to_dict", refuse)
    assert render(audit) == expected


def test_a_metric_table_without_ece_still_renders(monkeypatch):
    from prunescope.audit import metrics

    monkeypatch.setattr(metrics, "MODEL_METRICS",
                        [m for m in metrics.MODEL_METRICS if m.name != "ece"])
    result = synthetic_audit(n_boot=0)
    assert "ece" not in result.dense.values
    assert "ECE -" in render(result)


@pytest.mark.parametrize(("version", "message"), [
    ("prunescope.audit/1", "older than"), ("prunescope.audit/99", "newer than"),
    ("something", "re-run `prunescope audit`")])
def test_another_version_is_one_line(audit, version, message):
    data = {**audit.to_dict(), "version": version}
    with pytest.raises(ReportError, match=message) as exc:
        AuditResult.from_json(json.dumps(data))
    assert "\n" not in str(exc.value)


def test_a_metric_added_to_the_table_reaches_the_result_and_the_page(monkeypatch):
    import numpy as np

    from prunescope.audit import metrics

    def median_margin(outputs: metrics.Outputs) -> float:
        top2 = np.sort(outputs.probs, axis=1)[:, -2:]
        return float(np.median(top2[:, 1] - top2[:, 0]))

    extra = metrics.ModelMetric("median_margin", median_margin, "median margin XYZ")
    monkeypatch.setattr(metrics, "MODEL_METRICS", [*metrics.MODEL_METRICS, extra])
    result = AuditResult.from_json(synthetic_audit(n_boot=0).to_json())
    model = result.populations[1].models[0]
    assert model.values["median_margin"] > 0
    mean = np.mean([m.values["median_margin"] for m in result.populations[1].models])
    assert result.populations[1].values["median_margin"] == pytest.approx(mean)
    assert "median margin XYZ" in render(result)


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
    focus = audit.populations[1]
    assert f"CIEs <b>{focus.cie.count}</b>" in html
    assert "blue" in html and "orange" in html and "Bias amplification" in html


def test_report_escapes_names(audit):
    hostile = AuditResult.from_json(audit.to_json())
    hostile.dataset.name = "<b>x</b>"
    hostile.dataset.classes = ["<i>no</i>", "yes"]
    html = render(hostile)
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    assert "<i>no</i>" not in html


def test_rerender_writes_beside_the_json_and_refuses_other_versions(audit, tmp_path):
    path = tmp_path / "audit.json"
    path.write_text(audit.to_json())
    assert rerender(path) == tmp_path / "report.html"
    assert (tmp_path / "report.html").stat().st_size > 10_000
    path.write_text(json.dumps({**audit.to_dict(), "version": "prunescope.audit/999"}))
    with pytest.raises(ReportError, match="upgrade prunescope"):
        load_audit(path)
    with pytest.raises(ReportError, match="no such audit file"):
        load_audit(tmp_path / "missing.json")


def test_an_audit_of_the_right_version_with_missing_parts_is_one_line(tmp_path):
    path = tmp_path / "audit.json"
    path.write_text(json.dumps({"version": VERSION}))
    with pytest.raises(ReportError, match="incomplete or malformed") as exc:
        rerender(path)
    assert "\n" not in str(exc.value) and not (tmp_path / "report.html").exists()


def test_a_failed_render_leaves_no_audit_files(audit, tmp_path, monkeypatch):
    from prunescope.audit import audit as audit_module

    broken = AuditResult.from_json(audit.to_json())
    broken.populations = "not a list"
    with pytest.raises((TypeError, AttributeError)):
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
    path.write_text(audit.to_json())
    done = subprocess.run([sys.executable, "-c", POISON, str(path)], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_a_key_the_schema_does_not_hold_is_refused_not_dropped(audit):
    data = audit.to_dict()
    data["populations"][0]["surprise"] = 1
    with pytest.raises(AuditFileError, match="surprise"):
        AuditResult.from_dict(data)


# -- the remedies table --------------------------------------------------------------------------

# correct predictions per class (of 4 examples each) of every model of a 3-class task
REMEDY_MODELS = {"dense": [(4, 4, 3), (4, 3, 4)],
                 "fix s=0.9": [(4, 1, 3), (3, 2, 4)],  # two seeds: the focus population
                 "fix s=0.5": [(2, 4, 4)]}             # one seed


def _remedy_audit() -> AuditResult:
    """An audit of hand-made predictions (no randomness): each model is right on the first
    ``n_c`` examples of class c and predicts class c + 1 (mod 3) on the others."""
    import numpy as np

    from prunescope.audit import build
    from prunescope.audit.predictions import Predictions

    labels = np.repeat(np.arange(3), 4)
    members = {"dense": [], "compressed": []}
    for label, models in REMEDY_MODELS.items():
        for seed, right in enumerate(models):
            predicted = np.array([c if i < right[c] else (c + 1) % 3
                                  for c in range(3) for i in range(4)])
            logits = np.eye(3, dtype=np.float32)[predicted] * 3.0
            meta = {"run": f"{label}-{seed}", "split": "test", "dataset": "hand",
                    "classes": ["a", "b", "c"], "seed": seed}
            if label != "dense":
                meta["method"] = {"label": "fix", "sparsity": float(label.split("=")[1])}
            side = "dense" if label == "dense" else "compressed"
            members[side].append(Predictions(logits, labels, np.arange(12), None, meta))
    return build(members["dense"], members["compressed"], n_boot=0)


def test_remedies_table_against_hand_computed_values():
    from prunescope.report.remedies import remedies

    result = AuditResult.from_json(_remedy_audit().to_json())
    assert result.focus == ["fix s=0.9"]
    table = remedies(result)
    # recall means: dense (1, .875, .875), focus (.875, .375, .875): drops (.125, .5, 0)
    assert table.harmed_class == 1 and table.harmed_drop == pytest.approx(0.5)
    dense, single, focus = table.rows  # dense first, then the audit's order (by sparsity)
    assert [r.label for r in table.rows] == ["dense", "fix s=0.5", "fix s=0.9"]
    assert dense.accuracy.mean == pytest.approx(11 / 12)
    assert dense.worst.mean == pytest.approx(0.75) and dense.worst.interval == [0.75, 0.75]
    assert (dense.worst_class, dense.worst_models) == (1, 1)  # classes 2 and 1 tie: lower index
    assert dense.harmed.mean == pytest.approx(0.875) and dense.harmed.interval == [0.75, 1.0]
    assert focus.accuracy.mean == pytest.approx(17 / 24)
    assert focus.accuracy.interval == pytest.approx([8 / 12, 9 / 12])
    assert focus.worst.mean == pytest.approx(0.375) and focus.worst.interval == [0.25, 0.5]
    assert (focus.worst_class, focus.worst_models) == (1, 2)
    assert focus.harmed.mean == pytest.approx(0.375) and focus.harmed.interval == [0.25, 0.5]
    assert single.accuracy.interval_kind == "Wilson 95%"
    assert single.worst.mean == 0.5 and single.worst.interval is None
    assert (single.worst_class, single.worst_models) == (0, 1)
    assert single.harmed.mean == 1.0 and single.harmed.interval is None
    result.dense.recall[1] = None  # a class without a dense recall is never the harmed one
    assert remedies(result).harmed_class == 0 and remedies(result).harmed_drop == 0.125


def test_the_page_shows_the_remedies_table():
    html = render(_remedy_audit())
    section = html[html.index("<h2>Remedies"):]
    section = section[:section.index("<h2>", 4)]
    assert "The harmed class is b" in section and "lose most against dense" in section
    assert "it loses 50.00 points" in section and "harmed class (b) recall" in section
    rows = re.findall(r"<tr>(.*?)</tr>", section)[1:]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows]
    assert cells[0] == ["dense", "2", "91.7%", "[91.7%, 91.7%]", "75.0%", "[75.0%, 75.0%]",
                        "b (1 of 2)", "87.5%", "[75.0%, 100.0%]", "+0.00"]
    assert cells[2] == ["fix s=0.9", "2", "70.8%", "[66.7%, 75.0%]", "37.5%", "[25.0%, 50.0%]",
                        "b (2 of 2)", "37.5%", "[25.0%, 50.0%]", "-50.00"]
    assert cells[1][4:] == ["50.0%", "-", "a (1 of 1)", "100.0%", "-", "+12.50"]
