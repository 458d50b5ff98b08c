"""The audit end to end on a tiny digits experiment: populations, cached predictions, the audit
file, the CLI, and the bad inputs of the issue (one line, exit code 2, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pipeline_helpers import assert_user_error, cli, files_under
from test_audit_fixtures import synthetic_predictions, tiny_experiment

from prunescope import checkpoint
from prunescope.audit import AuditError, build, exemplars
from prunescope.audit.predictions import load_cached, load_or_compute, save
from prunescope.report import AUDIT_VERSION


@pytest.fixture(scope="module")
def run() -> Path:
    return tiny_experiment()


def _audit(run: Path) -> dict:
    return json.loads((run / "audit.json").read_text())


def test_experiment_writes_populations_audit_and_report(run):
    assert (run / "populations" / "seed1" / "dense" / "model.safetensors").is_file()
    assert (run / "populations" / "seed1" / "magnitude+global" / "s0.9").is_dir()
    audit = _audit(run)
    assert audit["version"] == AUDIT_VERSION
    assert audit["dense"]["k"] == 2
    labels = [b["label"] for b in audit["populations"]]
    assert labels == ["magnitude+global s=0.5", "magnitude+global s=0.9"]
    assert [b["k"] for b in audit["populations"]] == [1, 2]
    assert audit["focus"] == ["magnitude+global s=0.9"]
    html = (run / "report.html").read_text()
    assert "Compression audit: digits" in html


def test_population_of_one_degrades_to_flips(run, tmp_path):
    dense, _ = load_or_compute(run / "dense", cache_dir=tmp_path)
    single, _ = load_or_compute(run / "magnitude+global" / "s0.5", cache_dir=tmp_path)
    block = build([dense], [single], n_boot=0).to_dict()["populations"][0]
    assert block["welch"] is None
    flipped = np.flatnonzero(dense.predicted != single.predicted).tolist()
    assert block["cie"]["positions"] == flipped and block["models"][0]["flips"]["count"] > 0


def test_cie_block_is_consistent(run):
    focus = _audit(run)["populations"][1]
    cie = focus["cie"]
    assert sum(cie["per_class"]) == cie["count"] == len(cie["positions"])
    assert len(focus["welch"]) == 10 and len(focus["normalised_change"]) == 10
    assert set(focus["risk"]["cie"]) == set(_audit(run)["risk_signals"])


def test_predictions_are_cached_and_tied_to_the_checkpoint(run, tmp_path):
    copy, cache = tmp_path / "dense", tmp_path / "cache"
    shutil.copytree(run / "dense", copy)
    first, computed = load_or_compute(copy, cache_dir=cache)
    assert computed and not cache.exists()  # computing writes nothing
    save(first, cache)
    cached, computed = load_or_compute(copy, cache_dir=cache)
    assert not computed and cached.logits.shape == (359, 10)
    assert cached.meta["cost"]["params"] > 0 and cached.meta["run"] == str(copy)
    state = checkpoint.load(copy / "model.safetensors")
    state.model["classifier.0.bias"] += 1.0  # a different checkpoint: the cache is stale
    model = checkpoint.build_model(state, copy / "model.safetensors")
    checkpoint.save(copy / "model.safetensors", model, meta=state.meta)
    assert load_cached(copy, "test", cache) is None
    fresh, computed = load_or_compute(copy, cache_dir=cache)
    assert computed and not np.array_equal(fresh.logits, cached.logits)


def test_cli_audit_writes_both_files(run, tmp_path, capsys):
    out = tmp_path / "audit"
    code, stdout, err = cli(capsys, "audit", "--dense", run / "dense",
                            run / "populations" / "seed1" / "dense", "--compressed",
                            run / "magnitude+global" / "s0.9", "--out", out, "--bootstrap", "0")
    assert code == 0, err
    written = files_under(out)
    assert [f for f in written if not f.startswith(".cache/")] == ["audit.json", "report.html"]
    assert len(written) == 5  # and the three runs' predictions in .cache/predictions
    assert "report.html" in stdout
    assert json.loads((out / "audit.json").read_text())["settings"]["n_boot"] == 0


def test_cli_report_rerenders(run, tmp_path, capsys):
    shutil.copy(run / "audit.json", tmp_path / "audit.json")
    code, _, err = cli(capsys, "report", tmp_path / "audit.json")
    assert code == 0, err
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_empty_population_is_one_line_error(run, tmp_path, capsys):
    out = tmp_path / "audit"
    code, _, err = cli(capsys, "audit", "--dense", "--compressed", run / "dense", "--out", out)
    assert_user_error(code, err)
    code, _, err = cli(capsys, "audit", "--dense", tmp_path, "--compressed", run / "dense",
                       "--out", out)
    assert "holds no model.safetensors" in assert_user_error(code, err)
    assert not out.exists()


def test_a_run_given_twice_is_refused(run, tmp_path, capsys):
    out = tmp_path / "audit"
    code, _, err = cli(capsys, "audit", "--dense", run / "dense", run / "dense" / ".",
                       "--compressed", run / "dense", "--out", out)
    assert "given twice" in assert_user_error(code, err)
    assert not out.exists()


def test_runs_of_different_datasets_are_refused_before_any_work(run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    state = checkpoint.load(run / "dense" / "model.safetensors")
    model = checkpoint.build_model(state, run / "dense" / "model.safetensors")
    checkpoint.save(other / "model.safetensors", model,
                    meta={**state.meta, "data": {**state.meta["data"], "name": "mnist"}})
    out = tmp_path / "audit"
    code, _, err = cli(capsys, "audit", "--dense", run / "dense", "--compressed", other,
                       "--out", out)
    assert "different datasets or label spaces" in assert_user_error(code, err)
    assert not out.exists() and not (other / "predictions").exists()


def test_report_json_of_another_version_is_refused(tmp_path, capsys):
    path = tmp_path / "audit.json"
    path.write_text(json.dumps({"version": "prunescope.audit/0"}))
    code, _, err = cli(capsys, "report", path)
    assert "version 'prunescope.audit/0', older than" in assert_user_error(code, err)
    assert files_under(tmp_path) == ["audit.json"]
    path.write_text("not json")
    code, _, err = cli(capsys, "report", path)
    assert "is not JSON" in assert_user_error(code, err)


def test_predictions_from_another_split_or_label_space_are_refused():
    dense = synthetic_predictions(seed=0, accuracy=0.9)
    with pytest.raises(AuditError, match="different splits"):
        build([dense], [synthetic_predictions(seed=1, accuracy=0.9, split="val")])
    other = synthetic_predictions(seed=1, accuracy=0.9)
    other.meta["classes"] = ["a", "b"]
    with pytest.raises(AuditError, match="different label spaces"):
        build([dense], [other])
    shuffled = synthetic_predictions(seed=1, accuracy=0.9)
    shuffled.index[:] = shuffled.index[::-1].copy()
    with pytest.raises(AuditError, match="different examples"):
        build([dense], [shuffled])
    with pytest.raises(AuditError, match="at least one dense and one compressed"):
        build([dense], [])


def test_a_group_array_of_the_wrong_length_is_refused():
    good = synthetic_predictions(seed=0, accuracy=0.9)
    with pytest.raises(AuditError, match="group array .* has 399 entries for 400 examples"):
        type(good)(good.logits, good.labels, good.index, good.groups[:-1], good.meta)


@pytest.mark.parametrize(("section", "message"), [
    ({"seeds": 0}, "audit.seeds must be >= 1"),
    ({"sparsities": [1.0]}, "audit.sparsities"),
    ({"split": "dev"}, "audit.split must be one of"),
    ({"colour": 1}, "valid keys here: seeds, methods, sparsities, split, bootstrap"),
])
def test_bad_audit_sections_are_config_errors(section, message):
    from test_audit_fixtures import TINY_AUDIT_RECIPE

    from prunescope import recipe
    from prunescope.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        recipe.from_dict({**TINY_AUDIT_RECIPE, "audit": section})


def _with_logits(member, logits):
    return type(member)(logits.astype(np.float32), member.labels, member.index, member.groups,
                        member.meta)


def _nan_audit(caplog=None):
    dense = [synthetic_predictions(seed=s, accuracy=0.95, run=f"dense-{s}") for s in range(3)]
    half = dense[1].logits.copy()
    half[::2] = np.nan
    dense[1] = _with_logits(dense[1], half)
    compressed = []
    for s in range(3):
        member = synthetic_predictions(seed=10 + s, accuracy=0.85, run=f"sparse-{s}")
        member.meta.update(method={"label": "m", "sparsity": 0.9}, seed=s)
        compressed.append(member)
    compressed[2] = _with_logits(compressed[2], np.full_like(compressed[2].logits, np.nan))
    return build(dense, compressed, n_boot=0)


def test_non_finite_logits_are_counted_wrong_and_the_models_marked(caplog):
    from prunescope.report import render

    with caplog.at_level("WARNING"):
        result = _nan_audit()
    audit = result.to_dict()
    dense_models = audit["dense"]["models"]
    assert [m["non_finite"] for m in dense_models] == [0, 200, 0]
    assert dense_models[1]["accuracy"] <= 0.5  # half the examples never scored
    block = audit["populations"][0]
    assert block["models"][2]["non_finite"] == 400 and block["models"][2]["accuracy"] == 0.0
    assert block["models"][2]["collapsed"] and block["collapsed"] == ["sparse-2"]
    assert any("sparse-2" in w and "collapsed" in w for w in audit["warnings"])
    assert any("dense-1" in w and "non-finite" in w for w in audit["warnings"])
    assert "sparse-2" in caplog.text and "collapsed" in caplog.text
    html = render(result)
    assert "class='banner'" in html and "sparse-2" in html


def test_a_dense_model_without_a_finite_logit_is_refused():
    dense = synthetic_predictions(seed=0, accuracy=0.9, run="dense-nan")
    dense = _with_logits(dense, np.full_like(dense.logits, np.inf))
    compressed = synthetic_predictions(seed=1, accuracy=0.9)
    with pytest.raises(AuditError, match="dense-nan gives non-finite logits on every example"):
        build([dense], [compressed])


def test_a_collapsed_compressed_model_is_flagged():
    dense = synthetic_predictions(seed=0, accuracy=0.95)
    chance = synthetic_predictions(seed=1, accuracy=0.4, run="chance")
    block = build([dense], [chance], n_boot=0).to_dict()
    assert block["populations"][0]["collapsed"] == ["chance"]
    assert not block["dense"]["collapsed"]


def test_affected_classes_name_their_correction_and_the_chance_count():
    from test_audit_fixtures import synthetic_audit

    audit = synthetic_audit(n_boot=0).to_dict()
    summary = audit["populations"][1]["welch_summary"]
    assert summary["correction"] == audit["settings"]["correction"] == "holm-bonferroni"
    assert summary["tested"] == 2
    assert summary["expected_false_uncorrected"] == pytest.approx(0.05 * 2)
    assert audit["populations"][0]["welch_summary"] is None  # one compressed model


def test_a_single_seed_population_says_what_its_cies_are_beside_its_flips(caplog):
    dense = [synthetic_predictions(seed=s, accuracy=0.8, run=f"dense-{s}") for s in range(5)]
    single = synthetic_predictions(seed=30, accuracy=0.8, run="single")
    single.meta.update(method={"label": "m", "sparsity": 0.5}, seed=0)
    with caplog.at_level("WARNING"):
        block = build(dense, [single], n_boot=0).to_dict()["populations"][0]
    cie = block["cie"]
    assert cie["dense_models"] == 5 and cie["compressed_models"] == 1
    assert "modal label" in cie["definition"] and "1 compressed model" in cie["definition"]
    assert "seed" in cie["warning"] and "seed noise" in caplog.text
    flips = int((single.predicted != dense[0].predicted).sum())
    assert block["flip_count"] == flips and block["models"][0]["flips"]["paired_dense"] == "dense-0"
    modal = exemplars.modal_labels(np.stack([d.predicted for d in dense]), 2)
    assert cie["count"] == int((single.predicted != modal).sum()) != flips


def test_populations_of_several_seeds_carry_no_seed_noise_warning():
    from test_audit_fixtures import synthetic_audit

    block = synthetic_audit(n_boot=0).to_dict()["populations"][1]
    assert block["cie"]["warning"] is None and block["cie"]["compressed_models"] == 3


def _untrained_run(where: Path, name: str, *, seed: int = 0, sparsity: float | None = None,
                   spec: bool = True, image_size: int = 8) -> Path:
    """A run directory with an untrained ``name`` model for digits (pruned by magnitude to
    ``sparsity`` when given)."""
    import torch

    from prunescope import models, prune

    torch.manual_seed(seed)
    model = models.build(name, num_classes=10, in_channels=1, image_size=image_size)
    meta = {"data": {"name": "digits", "val_size": 100, "seed": 0},
            "model": checkpoint.model_spec(model, 10) if spec else None}
    mask = None
    if sparsity is not None:
        mask = prune(model, criterion="magnitude", allocation="global", sparsity=sparsity)
        meta["method"] = {"criterion": "magnitude", "allocation": "global",
                          "sparsity": sparsity}
    where.mkdir(parents=True)
    checkpoint.save(where / "model.safetensors", model, meta=meta, mask=mask)
    return where


def test_a_compressed_run_of_another_architecture_is_refused(tmp_path, capsys):
    dense = _untrained_run(tmp_path / "dense", "lenet300")
    other = _untrained_run(tmp_path / "lenet5", "lenet5", sparsity=0.5, image_size=12)
    out = tmp_path / "audit"
    code, _, err = cli(capsys, "audit", "--dense", dense, "--compressed", other, "--out", out)
    line = assert_user_error(code, err)
    assert "lenet300" in line and "lenet5" in line and "architecture" in line
    assert not out.exists()


def test_a_compressed_run_without_a_model_spec_is_a_warning(tmp_path, caplog):
    from prunescope.audit import precheck

    dense = _untrained_run(tmp_path / "dense", "lenet300")
    bare = _untrained_run(tmp_path / "bare", "lenet300", sparsity=0.5, spec=False)
    with caplog.at_level("WARNING"):
        precheck([dense], [bare])
    assert "bare" in caplog.text and "architecture" in caplog.text


def test_read_only_runs_are_audited_with_the_cache_in_the_output(tmp_path):
    import os
    import stat

    from prunescope.audit import run_audit

    runs = tmp_path / "runs"
    dense = _untrained_run(runs / "dense", "lenet300")
    sparse = _untrained_run(runs / "sparse", "lenet300", sparsity=0.5)
    before = files_under(runs)
    for d in (dense, sparse):
        os.chmod(d, 0o555)
    try:
        run_audit([dense], [sparse], tmp_path / "out", n_boot=0, log=lambda line: None)
        assert files_under(runs) == before
        cached = files_under(tmp_path / "out" / ".cache" / "predictions")
        assert len(cached) == 2
        lines: list[str] = []
        run_audit([dense], [sparse], tmp_path / "out2", n_boot=0, log=lines.append,
                  cache_dir=tmp_path / "out" / ".cache" / "predictions")
        assert not any("computed" in line for line in lines)  # both read from the cache
    finally:
        for d in (dense, sparse):
            os.chmod(d, stat.S_IRWXU)


def test_a_sweep_of_single_seed_populations_warns_once(caplog):
    dense = [synthetic_predictions(seed=s, accuracy=0.8, run=f"dense-{s}") for s in range(5)]
    singles = []
    for index, sparsity in enumerate((0.5, 0.8, 0.9, 0.95)):
        single = synthetic_predictions(seed=40 + index, accuracy=0.8, run=f"single-{index}")
        single.meta.update(method={"label": "m", "sparsity": sparsity}, seed=0)
        singles.append(single)
    with caplog.at_level("WARNING"):
        audit = build(dense, singles, n_boot=0).to_dict()
    seed_noise = [w for w in audit["warnings"] if "seed noise" in w]
    assert len(seed_noise) == 1 and seed_noise[0].startswith("4 populations (")
    assert caplog.text.count("seed noise") == 1


def test_the_summary_says_n_a_where_every_example_is_a_cie():
    """Every test example a CIE (a tiny split): the dense accuracy on "the rest" is over no
    example; the summary line says so instead of failing on the missing value."""
    import dataclasses

    from test_audit_fixtures import synthetic_audit

    from prunescope.audit.audit import summary_lines

    result = synthetic_audit(n_boot=0)
    block = next(b for b in result.populations if b.label in result.focus and b.cie.count)
    everything = dataclasses.replace(block, cie=dataclasses.replace(
        block.cie, dense_accuracy_rest=None))
    result = dataclasses.replace(result, populations=[
        everything if b is block else b for b in result.populations])
    line = next(x for x in summary_lines(result) if x.startswith(f"audit {block.label} "))
    assert line.endswith("vs n/a (no examples) on the rest")
