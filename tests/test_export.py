"""prunescope inspect and export: what a checkpoint holds, compact and ONNX exports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pipeline_helpers import cli, state_equal

from prunescope import checkpoint, export, models
from prunescope.errors import CheckpointError, ConfigError
from prunescope.files import save_tensors
from prunescope.mask import Mask
from prunescope.targets import default_targets

DATA = {"name": "mnist", "root": None, "val_size": 5000, "seed": 0}


def _pruned(name: str = "lenet300", sparsity: float = 0.9, image_size: int | None = None,
            apply: bool = True) -> tuple[torch.nn.Module, Mask]:
    """Registry model ``name`` with ``sparsity`` of its Linear/Conv weights pruned at random."""
    torch.manual_seed(0)
    model = models.build(name, image_size=image_size)
    generator = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    mask = Mask({n: torch.rand(params[n].shape, generator=generator) >= sparsity
                 for n in default_targets(model)})
    if apply:
        mask.apply_(model)
    return model, mask


def _save(path, model, mask=None, **meta):
    spec = checkpoint.model_spec(model, 10)
    checkpoint.save(path, model, meta={"model": spec, "data": DATA, **meta}, mask=mask)
    return path


# -- inspect ---------------------------------------------------------------------------------

def test_inspect_reports_the_masks_per_layer_and_global_sparsity(tmp_path, monkeypatch):
    model, mask = _pruned()
    path = _save(tmp_path / "model.safetensors", model, mask, epoch=3, step=1290)
    monkeypatch.setattr("prunescope.data.load", lambda *a, **kw: pytest.fail("loaded data"))
    info = export.inspect(path)
    assert info["kind"] == "checkpoint" and info["has_mask"]
    assert [x["name"] for x in info["layers"]] == list(mask)
    for layer in info["layers"]:
        keep = mask[layer["name"]]
        assert layer["shape"] == list(keep.shape) and layer["total"] == keep.numel()
        assert layer["kept"] == int(keep.sum())
        assert layer["sparsity"] == pytest.approx(mask.sparsities()[layer["name"]])
    assert (info["kept"], info["total"]) == (mask.num_kept, mask.num_total)
    assert info["sparsity"] == pytest.approx(mask.sparsity)
    assert info["model"] == checkpoint.model_spec(model, 10) and info["data"] == DATA
    assert (info["epoch"], info["step"]) == (3, 1290)
    assert info["bytes"] == path.stat().st_size


def test_inspect_without_a_mask_counts_the_zeros_of_the_prunable_weights(tmp_path):
    model, mask = _pruned("lenet5", 0.7)
    with torch.no_grad():
        model.get_parameter(default_targets(model)[-1].rpartition(".")[0] + ".bias").zero_()
    info = export.inspect(_save(tmp_path / "model.safetensors", model))
    assert not info["has_mask"]
    assert [x["name"] for x in info["layers"]] == default_targets(model)  # no biases
    assert [x["kept"] for x in info["layers"]] == [int(mask[n].sum()) for n in mask]


def test_inspect_reads_a_mask_file(tmp_path):
    _, mask = _pruned(sparsity=0.5)
    mask.save(tmp_path / "mask.safetensors")
    info = export.inspect(tmp_path / "mask.safetensors")
    assert info["kind"] == "mask" and info["model"] is None
    assert info["kept"] == mask.num_kept and info["sparsity"] == pytest.approx(mask.sparsity)


def test_inspect_refuses_a_file_that_is_neither_checkpoint_nor_mask(tmp_path):
    save_tensors(tmp_path / "x.safetensors", {"w": torch.ones(2)}, {"format": "other"})
    with pytest.raises(CheckpointError) as exc:
        export.inspect(tmp_path / "x.safetensors")
    assert "\n" not in str(exc.value) and "x.safetensors" in str(exc.value)


def test_inspect_command_prints_a_table_or_json(tmp_path, capsys):
    model, mask = _pruned()
    path = _save(tmp_path / "model.safetensors", model, mask, epoch=2, step=10)
    code, stdout, _ = cli(capsys, "inspect", path)
    assert code == 0
    for text in ("lenet300", "mnist", "2 / 10", *mask, "global", f"{mask.sparsity:.4f}"):
        assert text in stdout
    code, stdout, _ = cli(capsys, "inspect", path, "--json")
    assert code == 0 and json.loads(stdout)["sparsity"] == pytest.approx(mask.sparsity)


def test_inspect_command_refuses_a_missing_file_in_one_line(tmp_path, capsys):
    code, _, err = cli(capsys, "inspect", tmp_path / "nope.safetensors")
    assert code == 2 and err.count("\n") == 1 and "nope.safetensors" in err


# -- compact export --------------------------------------------------------------------------

@pytest.mark.parametrize("name, image_size", [("lenet300", None), ("resnet20", 16)])
def test_compact_export_rebuilds_the_state_dict_exactly(tmp_path, name, image_size):
    model, mask = _pruned(name, 0.9, image_size)
    path = _save(tmp_path / "model.safetensors", model, mask)
    export.export_compact(path, tmp_path / "compact.safetensors")
    rebuilt = export.load_compact(tmp_path / "compact.safetensors")
    assert state_equal(rebuilt, model.state_dict())


def test_compact_export_of_90_percent_sparsity_is_smaller_than_the_dense_checkpoint(tmp_path):
    model, mask = _pruned()
    dense = _save(tmp_path / "dense.safetensors", models.build("lenet300"))
    path = _save(tmp_path / "model.safetensors", model, mask)
    sizes = export.export_compact(path, tmp_path / "compact.safetensors")
    assert sizes["bytes"] == (tmp_path / "compact.safetensors").stat().st_size
    assert sizes["bytes"] < 0.25 * dense.stat().st_size
    assert sizes["checkpoint_bytes"] == path.stat().st_size


def test_compact_export_applies_the_mask(tmp_path):
    model, mask = _pruned(apply=False)  # weights not zeroed, e.g. a dense phase's checkpoint
    path = _save(tmp_path / "last.safetensors", model, mask)
    export.export_compact(path, tmp_path / "compact.safetensors")
    rebuilt = export.load_compact(tmp_path / "compact.safetensors")
    assert state_equal(rebuilt, mask.apply_(model).state_dict())


def test_load_compact_refuses_other_files_and_corrupt_indices(tmp_path):
    model, mask = _pruned()
    path = _save(tmp_path / "model.safetensors", model, mask)
    with pytest.raises(CheckpointError, match="not a compact export"):
        export.load_compact(path)
    export.export_compact(path, tmp_path / "compact.safetensors")
    tensors, meta = __import__("prunescope.files").files.load_tensors(
        tmp_path / "compact.safetensors")
    name = next(iter(meta["csr_shapes"]))
    tensors[f"csr/{name}/col_indices"][0] = 30000  # beyond the columns
    save_tensors(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(CheckpointError) as exc:
        export.load_compact(tmp_path / "bad.safetensors")
    assert "corrupt" in str(exc.value) and "\n" not in str(exc.value)


def test_export_command_writes_the_file_and_prints_the_sizes(tmp_path, capsys):
    model, mask = _pruned()
    path = _save(tmp_path / "model.safetensors", model, mask)
    code, stdout, err = cli(capsys, "export", path, "--format", "compact", "--out",
                            tmp_path / "c.safetensors")
    assert code == 0, err
    sizes = json.loads(stdout)
    assert sizes["bytes"] == (tmp_path / "c.safetensors").stat().st_size
    assert sizes["bytes"] < 0.25 * sizes["dense_bytes"]


# -- ONNX export -----------------------------------------------------------------------------

def test_onnx_export_computes_what_the_sparse_model_computes(tmp_path):
    import onnx
    from onnx.reference import ReferenceEvaluator

    model, mask = _pruned("lenet5", 0.9, 12)
    path = _save(tmp_path / "model.safetensors", model, mask)
    sizes = export.export_onnx(path, tmp_path / "model.onnx")
    assert sizes["bytes"] == (tmp_path / "model.onnx").stat().st_size
    proto = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(proto)
    x = torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    (logits,) = ReferenceEvaluator(proto).run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_onnx_export_without_its_packages_says_what_to_install(tmp_path, monkeypatch):
    real = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real(name, *a))
    model, _ = _pruned()
    with pytest.raises(ConfigError) as exc:
        export.export_onnx(_save(tmp_path / "m.safetensors", model), tmp_path / "m.onnx")
    assert "onnxscript" in str(exc.value) and "prunescope[onnx]" in str(exc.value)
    assert not (tmp_path / "m.onnx").exists()
