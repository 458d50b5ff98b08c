"""Sparse inference files: export, verification, loading onto the kernels, running, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from hub_helpers import tiny_model
from pipeline_helpers import cli
from torch import nn

import prunescope
from prunescope import checkpoint, files, models
from prunescope.errors import CheckpointError, ConfigError
from prunescope.kernels import build, runtime, sparse_file
from prunescope.kernels.formats import compress
from prunescope.mask import Mask
from prunescope.targets import default_targets

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RTOL = 1e-5  # relative to the largest reference entry
DIGITS = {"name": "digits", "root": None, "val_size": 100, "seed": 0}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    error = (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)
    assert error <= RTOL, f"relative error {error:.2e} > {RTOL:.0e}"


def random_mask(model: nn.Module, names: list[str], sparsity: float, seed: int = 1) -> Mask:
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    keep = {n: torch.rand(params[n].shape, generator=generator) >= sparsity for n in names}
    first = names[0]
    keep[first][0] = False  # an all-pruned output row
    return Mask(keep)


def pruned(name: str, image_size: int, sparsity: float = 0.9) -> tuple[nn.Module, Mask]:
    """Registry model ``name`` (10 classes) with ``sparsity`` of its targets pruned at random and
    the mask applied (the dense masked model: the reference)."""
    torch.manual_seed(0)
    model = models.build(name, image_size=image_size).eval()
    mask = random_mask(model, default_targets(model), sparsity)
    mask.apply_(model)
    return model, mask


def export_registry(tmp_path, model: nn.Module, mask: Mask, name: str = "m") -> object:
    out = tmp_path / f"{name}.sparse.safetensors"
    runtime.export(model, dict(mask.items()), out, spec=checkpoint.model_spec(model, 10))
    return out


@pytest.fixture
def fresh_backend():
    """A test that changes the backend gives the next test the default one back."""
    build.reset()
    yield
    build.reset()


# -- outputs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, image_size, shape", [
    ("lenet300", 28, (1, 28, 28)), ("conv2", 8, (3, 8, 8)), ("lenet5", 12, (1, 12, 12)),
    ("resnet20", 8, (3, 8, 8)), ("conv4", 8, (3, 8, 8)), ("conv6", 8, (3, 8, 8)),
])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_outputs_equal_the_dense_masked_model(tmp_path, name, image_size, shape, batch):
    model, mask = pruned(name, image_size)
    loaded = runtime.load(export_registry(tmp_path, model, mask))
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
    assert loaded.compiled is not None  # registry models run the straight-line forward
    assert_close(loaded(x), expected)
    with torch.inference_mode():
        assert_close(loaded.run(x), expected)
    tree = runtime.load(export_registry(tmp_path, model, mask), trace=False)
    assert tree.compiled is None
    assert_close(tree(x), expected)


def test_every_masked_layer_runs_sparse_and_the_model_is_left_as_it_was(tmp_path):
    model, mask = pruned("conv2", 8)
    raw, _ = pruned("conv2", 8)
    with torch.no_grad():
        raw.features[0].weight.add_(1.0)  # pruned places not zero: export drops them
    before = {k: v.clone() for k, v in raw.state_dict().items()}
    out = tmp_path / "raw.sparse.safetensors"
    runtime.export(raw, dict(mask.items()), out, spec=checkpoint.model_spec(raw, 10))
    assert all(torch.equal(before[k], v) for k, v in raw.state_dict().items())
    loaded = runtime.load(out)
    assert loaded.sparse_layers == [n.rpartition(".")[0] for n in mask]
    assert isinstance(loaded.net.features[2], runtime.InferenceConv2d)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = mask.apply_(raw)(x)
    assert_close(loaded(x), expected)


class Odd(nn.Module):
    """Convolutions the registry does not have (stride, groups, dilation, 'same' padding with
    an even kernel, no bias) and a Linear on 3-d input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.b = nn.Conv2d(6, 6, (2, 3), padding="same", dilation=(1, 2), bias=False)
        self.c = nn.Linear(5, 3)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))  # [N, 6, 5, 5]
        return self.c(y.flatten(2, 3)[..., :5])  # [N, 6, 5] -> [N, 6, 3]


def test_a_user_defined_model_loads_into_its_own_architecture(tmp_path):
    torch.manual_seed(0)
    model = Odd().eval()
    mask = random_mask(model, ["a.weight", "b.weight", "c.weight"], 0.6)
    mask.apply_(model)
    out = tmp_path / "odd.sparse.safetensors"
    runtime.export(model, dict(mask.items()), out, spec={})
    loaded = runtime.load(out, model=Odd())
    assert sorted(loaded.sparse_layers) == ["a", "b", "c"]
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        expected = model(x)
    assert_close(loaded(x), expected)


def test_a_tiny_bert_runs_from_the_file_alone(tmp_path):
    from prunescope.hub.models import build as build_hf

    folder = tiny_model(tmp_path / "bert")
    spec = {"source": "huggingface", "path": str(folder), "task": "sequence-classification",
            "num_labels": 3}
    torch.manual_seed(0)
    model = build_hf(spec).eval()
    names = default_targets(model)
    assert len(names) == 12
    mask = random_mask(model, names, 0.8)
    mask.apply_(model)
    out = tmp_path / "bert.sparse.safetensors"
    runtime.export(model, dict(mask.items()), out, spec=spec)
    shutil.rmtree(folder)  # the file holds the config: no model folder is needed to run it
    loaded = runtime.load(out)
    assert len(loaded.sparse_layers) == 12
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 20, (3, 10), generator=generator)
    attention = (torch.arange(10)[None] < torch.tensor([[10], [6], [3]])).long()
    x = torch.stack([ids * attention, attention], dim=1)
    with torch.no_grad():
        expected = model(x)
    assert_close(loaded(x), expected)


# -- the file ---------------------------------------------------------------------------------

def test_sparse_layers_store_only_kept_values_and_indices(tmp_path):
    model, mask = pruned("lenet300", 28)
    out = export_registry(tmp_path, model, mask)
    tensors, meta, _ = files.read_stored(out)
    layer = "classifier.0"
    assert f"dense/{layer}.weight" not in tensors and f"dense/{layer}.bias" in tensors
    keep = mask[f"{layer}.weight"]
    assert torch.equal(tensors[f"sparse/{layer}/values"], model.classifier[0].weight[keep])
    assert tensors[f"sparse/{layer}/idx"].dtype == torch.int16  # 784 columns
    assert tensors[f"sparse/{layer}/ptr"].dtype == torch.int32
    assert meta["layers"][layer] == {"kind": "linear", "shape": [300, 784], "bias": True,
                                     "kept": int(keep.sum())}
    assert meta["architecture"] == sparse_file.architecture(models.build("lenet300"))
    dense = tmp_path / "dense.safetensors"
    files.save_tensors(dense, dict(model.state_dict()), {})
    assert out.stat().st_size < 0.2 * dense.stat().st_size


@pytest.mark.parametrize("shape, groups", [((7, 13), 1), ((6, 4, 3, 2), 1), ((6, 2, 3, 3), 2),
                                           ((4, 1, 3, 3), 4)])
def test_the_index_structure_is_the_kernels_own(shape, groups):
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(shape, generator=generator)
    keep = torch.rand(shape, generator=generator) < 0.4
    keep[1] = False
    expected = compress(weight, keep, groups)
    built = runtime.transpose(sparse_file.encode(weight, keep), groups)
    assert torch.equal(sparse_file.encode(weight, keep).values, expected.values)
    for name, tensor in expected.structure().items():
        assert built[name].dtype == tensor.dtype and torch.equal(built[name], tensor), name


def test_encode_and_dense_round_trip():
    weight = torch.randn(5, 3, 2, 2)
    keep = torch.rand(5, 3, 2, 2) < 0.5
    assert torch.equal(sparse_file.encode(weight, keep).dense(), weight * keep)


# -- bad input ---------------------------------------------------------------------------------

def one_line(exc: pytest.ExceptionInfo, *words: str) -> str:
    message = str(exc.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_a_flipped_byte_is_refused_as_corrupt(tmp_path):
    model, mask = pruned("lenet300", 28)
    out = export_registry(tmp_path, model, mask)
    data = bytearray(out.read_bytes())
    data[-100] ^= 0x01  # inside the last tensor
    out.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as exc:
        runtime.load(out)
    one_line(exc, "corrupt", "fingerprint", str(out))


def test_a_truncated_file_is_refused(tmp_path):
    model, mask = pruned("lenet300", 28)
    out = export_registry(tmp_path, model, mask)
    out.write_bytes(out.read_bytes()[:-1000])
    with pytest.raises(CheckpointError) as exc:
        runtime.load(out)
    one_line(exc, str(out))


def rewrite(path, edit) -> None:
    """Apply ``edit(tensors, meta)`` and store the file again with a valid fingerprint (what a
    hand-edited or buggy writer would produce: only the structure checks can catch it)."""
    tensors, meta, _ = files.read_stored(path)
    edit(tensors, meta)
    meta["fingerprint"] = sparse_file.fingerprint(tensors, meta)
    files.save_tensors(path, tensors, meta)


@pytest.mark.parametrize("edit, words", [
    (lambda t, m: t["sparse/classifier.2/idx"].__setitem__(0, 300), ["column index"]),
    (lambda t, m: t["sparse/classifier.2/idx"].__setitem__(
        slice(0, 2), torch.tensor([5, 5], dtype=torch.int16)), ["increase"]),
    (lambda t, m: t["sparse/classifier.2/ptr"].__setitem__(-1, 3), ["row pointer"]),
    (lambda t, m: t.pop("sparse/classifier.4/values"), ["missing"]),
    (lambda t, m: m["layers"]["classifier.4"].update(kind="conv3d"), ["conv3d", "do not run"]),
    (lambda t, m: m["layers"]["classifier.4"].update(shape=[10, 99]), ["classifier.4"]),
    (lambda t, m: m["model"].update(name="lenet5"), ["lenet5", "not the one"]),
])
def test_inconsistent_content_is_refused_in_one_line(tmp_path, edit, words):
    model, mask = pruned("lenet300", 28)
    out = export_registry(tmp_path, model, mask)
    rewrite(out, edit)
    with pytest.raises(CheckpointError) as exc:
        runtime.load(out)
    one_line(exc, str(out), *words)


def test_a_file_of_another_model_is_refused(tmp_path):
    model, mask = pruned("lenet300", 28)
    out = export_registry(tmp_path, model, mask)
    with pytest.raises(CheckpointError) as exc:
        runtime.load(out, model=models.build("lenet300", num_classes=5))
    one_line(exc, "lenet300", "not of this model")


def test_a_user_defined_model_needs_its_architecture_and_inputs_need_its_dtype(tmp_path):
    torch.manual_seed(0)
    model = Reuse().eval()
    out = tmp_path / "reuse.sparse.safetensors"
    runtime.export(model, {"a.weight": torch.rand(6, 6) < 0.5}, out, spec={})
    with pytest.raises(CheckpointError) as exc:
        runtime.load(out)
    one_line(exc, "user-defined", "model=")
    loaded = runtime.load(out, model=Reuse())
    with pytest.raises(ConfigError) as exc:
        loaded(torch.randn(2, 6, dtype=torch.float64))
    one_line(exc, "float32", "float64")


def test_other_files_are_refused(tmp_path):
    model, mask = pruned("lenet300", 28)
    path = tmp_path / "model.safetensors"
    checkpoint.save(path, model, meta={"model": checkpoint.model_spec(model, 10)}, mask=mask)
    with pytest.raises(CheckpointError) as exc:
        runtime.load(path)
    one_line(exc, "not a sparse inference file", "--format sparse")
    (tmp_path / "x.pt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError) as exc:
        runtime.load(tmp_path / "x.pt")
    one_line(exc, "pickle")


class WithUnsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.line = nn.Conv1d(4, 4, 3)
        self.head = nn.Linear(4 * 6, 3)

    def forward(self, x):
        y = torch.relu(self.pad(x)).mean(2)  # [N, 4, 8]
        return self.head(self.line(y).flatten(1))


def test_layers_without_a_kernel_are_stored_dense_with_one_warning_line(tmp_path):
    torch.manual_seed(0)
    model = WithUnsupported().eval()
    mask = random_mask(model, ["pad.weight", "line.weight", "head.weight"], 0.7)
    mask.apply_(model)
    out = tmp_path / "u.sparse.safetensors"
    with pytest.warns(RuntimeWarning) as caught:
        result = runtime.export(model, dict(mask.items()), out, spec={})
    (message,) = [str(w.message) for w in caught if "no sparse kernel" in str(w.message)]
    assert "\n" not in message
    for word in ("pad.weight", "reflect", "line.weight", "Conv1d", "stored dense"):
        assert word in message
    assert result["sparse_layers"] == ["head"]
    loaded = runtime.load(out, model=WithUnsupported())
    assert loaded.sparse_layers == ["head"]
    x = torch.randn(2, 2, 5, 8)
    with torch.no_grad():
        expected = model(x)
    assert_close(loaded(x), expected)


def test_without_fast_kernels_the_file_runs_dense_and_still_right(tmp_path, monkeypatch,
                                                                  fresh_backend):
    model, mask = pruned("conv2", 8)
    out = export_registry(tmp_path, model, mask)
    monkeypatch.setenv("PRUNESCOPE_KERNELS", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the kernels' one line saying why
        loaded = runtime.load(out)
    assert loaded.sparse_layers == []
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    assert_close(loaded(x), expected)


# -- the command line ----------------------------------------------------------------------------

@pytest.fixture
def digits_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = models.build("lenet300", num_classes=10, in_channels=1, image_size=8)
    mask = random_mask(model, default_targets(model), 0.9)
    mask.apply_(model)
    path = tmp_path / "model.safetensors"
    checkpoint.save(path, model, meta={"model": checkpoint.model_spec(model, 10),
                                       "data": DIGITS}, mask=mask)
    return path


def test_export_and_evaluate_from_the_sparse_file(digits_checkpoint, tmp_path, capsys,
                                                  monkeypatch):
    monkeypatch.setattr(runtime, "_fastest", lambda *args: (5.0, 1.0))  # all faster sparse
    out = tmp_path / "lenet.sparse.safetensors"
    code, stdout, err = cli(capsys, "export", digits_checkpoint, "--format", "sparse", "--out",
                            out)
    assert code == 0, err
    sizes = json.loads(stdout)
    assert sizes["format"] == "sparse" and sizes["bytes"] == out.stat().st_size
    assert sizes["bytes"] < 0.25 * sizes["dense_bytes"]
    assert sizes["sparse_layers"] == ["classifier.0", "classifier.2", "classifier.4"]
    code, stdout, err = cli(capsys, "evaluate", "--checkpoint", digits_checkpoint)
    assert code == 0, err
    plain = json.loads(stdout)
    code, stdout, err = cli(capsys, "evaluate", "--checkpoint", out)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["accuracy"] == plain["accuracy"]
    assert report["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert report["sparse_layers"] == (sizes["sparse_layers"] if build.backend().fast else [])
    code, stdout, err = cli(capsys, "inspect", out)
    assert code == 0, err
    assert "classifier.0" in stdout and "sparse" in stdout


def test_evaluate_refuses_a_corrupt_file_and_levels_in_one_line(digits_checkpoint, tmp_path,
                                                                 capsys):
    out = tmp_path / "lenet.sparse.safetensors"
    assert cli(capsys, "export", digits_checkpoint, "--format", "sparse", "--out", out)[0] == 0
    code, _, err = cli(capsys, "evaluate", "--checkpoint", out, "--level", "0.5")
    assert code == 2 and err.count("\n") == 1 and "--level" in err
    data = bytearray(out.read_bytes())
    data[-10] ^= 0xFF
    out.write_bytes(bytes(data))
    code, stdout, err = cli(capsys, "evaluate", "--checkpoint", out)
    assert code == 2 and stdout == "" and err.count("\n") == 1 and "corrupt" in err


def test_prune_result_runs_from_the_file(tmp_path):
    """The public entry points together: prune, export, load, run."""
    torch.manual_seed(0)
    model = models.build("lenet300").eval()
    mask = prunescope.prune(model, "magnitude", "uniform", 0.9)
    mask.apply_(model)
    out = export_registry(tmp_path, model, mask)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    assert_close(runtime.load(out)(x), expected)


# -- the compiled forward ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 7, 9), (1, 1, 2, 2), (3, 4, 5)])
def test_the_2x2_max_pooling_equals_pytorchs(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    x.view(-1)[3] = float("nan")
    expected = nn.functional.max_pool2d(x, 2)
    assert torch.equal(runtime.max_pool_2x2(x).isnan(), expected.isnan())
    assert torch.equal(runtime.max_pool_2x2(x).nan_to_num(), expected.nan_to_num())


class Reuse(nn.Module):
    """A layer output read twice (by a ReLU and by the sum): the ReLU must not run in place."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.relu = nn.Linear(6, 6), nn.Linear(6, 6), nn.ReLU()

    def forward(self, x):
        y = self.a(x)
        return self.b(self.relu(y)) + y


def test_in_place_activations_only_where_nothing_else_reads_the_input(tmp_path):
    torch.manual_seed(0)
    model = Reuse().eval()
    mask = random_mask(model, ["a.weight", "b.weight"], 0.5)
    mask.apply_(model)
    out = tmp_path / "reuse.sparse.safetensors"
    runtime.export(model, dict(mask.items()), out, spec={})
    loaded = runtime.load(out, model=Reuse())
    assert loaded.compiled is not None and "relu_" not in loaded.compiled.source
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = model(x)
    assert_close(loaded(x), expected)


def test_a_mask_of_another_model_is_refused_at_export(tmp_path):
    model, _ = pruned("lenet300", 28)
    with pytest.raises(ConfigError) as exc:
        runtime.export(model, {"classifier.0.weight": torch.ones(3, 3, dtype=torch.bool)},
                       tmp_path / "x.sparse.safetensors", spec={})
    one_line(exc, "classifier.0.weight", "not a parameter")
    assert not (tmp_path / "x.sparse.safetensors").exists()


def test_with_an_example_each_layer_runs_sparse_only_where_measured_faster(tmp_path,
                                                                          monkeypatch):
    model, mask = pruned("conv2", 8)
    out = export_registry(tmp_path, model, mask)
    x = torch.randn(5, 3, 8, 8)
    seen = {}

    def fake(layers, example, repeats):  # the first conv "measures" faster dense
        name = "dense" if not seen else "sparse"
        seen.setdefault("shape", list(example.shape))
        return (1.0, 5.0) if name == "dense" else (5.0, 1.0)

    monkeypatch.setattr(runtime, "_fastest", fake)
    logged = []
    loaded = runtime.load(out, example=x, log=logged.append)
    if not build.backend().fast:
        assert loaded.choices == [] and loaded.sparse_layers == []
        return
    assert seen["shape"] == [5, 3, 8, 8]  # timed at the shape the layer receives
    assert loaded.sparse_layers == [n.rpartition(".")[0] for n in mask][1:]
    assert type(loaded.net.features[0]) is nn.Conv2d and not loaded.net.features[0].weight.is_meta
    assert [c["sparse"] for c in loaded.choices] == [False, True, True, True, True]
    assert "dense (not faster)" in logged[0] and "features.0" in logged[0]
    with torch.no_grad():
        expected = model(x)
    assert_close(loaded(x), expected)
