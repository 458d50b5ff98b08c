"""Atomic writes, JSON lines and the safe tensor file format (prunescope.files)."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prunescope import files
from prunescope.errors import CheckpointError
from prunescope.files import (
    append_jsonl,
    atomic_write_bytes,
    load_tensors,
    read_jsonl,
    save_tensors,
    write_json,
)


class _Marker:
    """Unpickling this object creates the file ``path``: proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _check_one_line(exc: pytest.ExceptionInfo[CheckpointError]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


# -- atomic writes ---------------------------------------------------------------------------

def test_atomic_write_creates_parents_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "dir" / "file.bin"
    atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert os.listdir(target.parent) == ["file.bin"]


def test_atomic_write_replaces_existing_content(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["file.bin"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()],
                         ids=["OSError", "KeyboardInterrupt"])
def test_failed_atomic_write_keeps_old_content_and_no_temporary_file(tmp_path, monkeypatch,
                                                                     failing, error):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old content")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(files.os, failing, fail)
    with pytest.raises(type(error)):
        atomic_write_bytes(target, b"new content that never lands")
    monkeypatch.undo()
    assert target.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_failed_first_write_leaves_no_file_at_all(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("boom")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "file.bin", b"data")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_write_json_round_trips(tmp_path):
    obj = {"a": 1, "b": [0.5, None, "x"], "nested": {"c": True}}
    write_json(tmp_path / "x.json", obj)
    assert json.loads((tmp_path / "x.json").read_text()) == obj


# -- JSON lines ------------------------------------------------------------------------------

def test_read_jsonl_returns_appended_records_in_order(tmp_path):
    path = tmp_path / "m.jsonl"
    for i in range(3):
        append_jsonl(path, {"epoch": i, "loss": 1.0 / (i + 1)})
    assert read_jsonl(path) == [{"epoch": i, "loss": 1.0 / (i + 1)} for i in range(3)]


def test_read_jsonl_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"epoch": 0})
    append_jsonl(path, {"epoch": 1})
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"epoch": 2, "lo')  # the writer was killed mid-line
    assert read_jsonl(path) == [{"epoch": 0}, {"epoch": 1}]


# -- safe tensor files -----------------------------------------------------------------------

def test_save_and_load_tensors_round_trip(tmp_path):
    tensors = {"w": torch.randn(3, 4), "keep": torch.rand(5) > 0.5,
               "count": torch.tensor(7, dtype=torch.int64)}
    meta = {"format": "x", "epoch": 3, "nested": {"a": [1, 2]}}
    save_tensors(tmp_path / "t.safetensors", tensors, meta)
    loaded, loaded_meta = load_tensors(tmp_path / "t.safetensors")
    assert loaded_meta == meta
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype
        assert torch.equal(loaded[key], tensor)


def test_load_tensors_refuses_a_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        load_tensors(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in _check_one_line(exc)


def test_marker_object_really_runs_code_when_unpickled(tmp_path):
    """Self-check of the test below: the marker file does appear when the pickle is loaded."""
    marker = tmp_path / "unpickled"
    pickle.loads(pickle.dumps({"x": _Marker(str(marker))}))
    assert marker.exists()


@pytest.mark.parametrize("writer", ["torch.save", "pickle-0", "pickle-2", "pickle-5"])
def test_load_tensors_refuses_a_pickle_without_unpickling_it(tmp_path, writer):
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.pt"
    payload = {"weight": torch.zeros(2), "evil": _Marker(str(marker))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(writer.split("-")[1])))
    with pytest.raises(CheckpointError) as exc:
        load_tensors(path)
    _check_one_line(exc)
    assert not marker.exists()


def test_pickle_refusal_says_prunescope_never_unpickles(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError) as exc:
        load_tensors(path)
    assert "pickle" in _check_one_line(exc)


@pytest.mark.parametrize("size", [0, 5, 64, 4096])
def test_load_tensors_refuses_random_bytes(tmp_path, size):
    path = tmp_path / "random.safetensors"
    path.write_bytes(torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(size),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError) as exc:
        load_tensors(path)
    _check_one_line(exc)


def test_load_tensors_refuses_a_truncated_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"w": torch.randn(100)}, {"format": "x"})
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(CheckpointError) as exc:
        load_tensors(path)
    _check_one_line(exc)


@pytest.mark.parametrize("metadata", [None, {"other": "thing"}])
def test_load_tensors_refuses_safetensors_not_written_by_prunescope(tmp_path, metadata):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.randn(2, 2)}, str(path), metadata=metadata)
    with pytest.raises(CheckpointError) as exc:
        load_tensors(path)
    assert "prunescope" in _check_one_line(exc)


def test_load_tensors_refuses_corrupt_prunescope_metadata(tmp_path):
    path = tmp_path / "bad-meta.safetensors"
    save_file({"w": torch.randn(2)}, str(path), metadata={files.META_KEY: "{not json"})
    with pytest.raises(CheckpointError) as exc:
        load_tensors(path)
    _check_one_line(exc)


# -- compact storage of sparse content -------------------------------------------------------

def _stored(path) -> dict[str, torch.Tensor]:
    """The tensors as they lie in the file, not decoded."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(300, 784), (3, 5, 7), (13,), (), (0, 4)])
def test_bool_tensors_are_stored_in_bits_or_indices_and_round_trip(tmp_path, shape, density):
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < density
    save_tensors(tmp_path / "m.safetensors", {"keep": keep}, {})
    loaded, _ = load_tensors(tmp_path / "m.safetensors")
    assert loaded["keep"].dtype == torch.bool and torch.equal(loaded["keep"], keep)
    stored = _stored(tmp_path / "m.safetensors")["keep"]
    assert stored.dtype != torch.bool
    assert stored.numel() * stored.element_size() <= (keep.numel() + 7) // 8


def test_a_very_sparse_mask_is_stored_as_indices_smaller_than_bits(tmp_path):
    keep = torch.zeros(1000, 100, dtype=torch.bool)
    keep[3, 7] = keep[999, 99] = True
    save_tensors(tmp_path / "m.safetensors", {"keep": keep}, {})
    assert _stored(tmp_path / "m.safetensors")["keep"].tolist() == [307, 99999]


def test_files_with_bool_tensors_stored_as_bytes_still_load(tmp_path):
    keep = torch.rand(7, 9, generator=torch.Generator().manual_seed(2)) > 0.5
    save_file({"keep": keep}, str(tmp_path / "old.safetensors"),
              metadata={files.META_KEY: json.dumps({"format": "x"})})
    loaded, meta = load_tensors(tmp_path / "old.safetensors")
    assert meta == {"format": "x"} and torch.equal(loaded["keep"], keep)


def test_a_masked_tensor_is_stored_as_its_kept_values_only(tmp_path):
    keep = torch.rand(50, 40, generator=torch.Generator().manual_seed(3)) > 0.9
    weight = torch.randn(50, 40) * keep
    save_tensors(tmp_path / "c.safetensors", {"w": weight, "m": keep}, {}, kept_by={"w": "m"})
    assert _stored(tmp_path / "c.safetensors")["w"].numel() == int(keep.sum())
    loaded, _ = load_tensors(tmp_path / "c.safetensors")
    assert loaded["w"].dtype == weight.dtype and torch.equal(loaded["w"], weight)


def test_a_masked_tensor_with_nonzero_pruned_entries_is_stored_whole(tmp_path):
    keep = torch.rand(6, 5, generator=torch.Generator().manual_seed(4)) > 0.5
    weight = torch.randn(6, 5)  # e.g. the dense phase of AC/DC: the mask is not applied
    save_tensors(tmp_path / "c.safetensors", {"w": weight, "m": keep}, {}, kept_by={"w": "m"})
    assert _stored(tmp_path / "c.safetensors")["w"].shape == (6, 5)
    assert torch.equal(load_tensors(tmp_path / "c.safetensors")[0]["w"], weight)


@pytest.mark.parametrize("encoding", [
    '{"keep": {"as": "bits", "shape": [1000]}}', '{"keep": {"as": "indices", "shape": [2]}}',
    '{"keep": {"as": "zip", "shape": [3]}}', '{"w": {"as": "kept", "shape": [3], "mask": "x"}}',
    "[1, 2", '{"keep": 5}'])
def test_load_tensors_refuses_a_corrupt_encoding(tmp_path, encoding):
    path = tmp_path / "bad.safetensors"
    save_file({"keep": torch.tensor([1, 5], dtype=torch.int32), "w": torch.ones(2)}, str(path),
              metadata={files.META_KEY: "{}", files.ENCODING_KEY: encoding})
    with pytest.raises(CheckpointError) as exc:
        load_tensors(path)
    assert "encoding" in _check_one_line(exc)


# -- file modes ------------------------------------------------------------------------------

@pytest.fixture(params=[0o022, 0o077, 0o002], ids=lambda u: f"umask{u:03o}")
def umask(request):
    """Run the test under the given umask; the mode a plain ``open(..., "w")`` gives."""
    old = os.umask(request.param)
    try:
        yield 0o666 & ~request.param
    finally:
        os.umask(old)


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_atomic_writes_get_the_mode_plain_open_gets_under_the_umask(tmp_path, umask):
    atomic_write_bytes(tmp_path / "file.bin", b"data")
    write_json(tmp_path / "result.json", {"a": 1})
    save_tensors(tmp_path / "t.safetensors", {"x": torch.ones(2)}, {})
    with open(tmp_path / "plain", "w"):
        pass
    assert _mode(tmp_path / "plain") == umask
    assert {_mode(tmp_path / n) for n in ("file.bin", "result.json", "t.safetensors")} == {umask}


def test_appended_lines_get_the_mode_plain_open_gets_under_the_umask(tmp_path, umask):
    append_jsonl(tmp_path / "metrics.jsonl", {"epoch": 1})
    append_jsonl(tmp_path / "metrics.jsonl", {"epoch": 2})
    assert _mode(tmp_path / "metrics.jsonl") == umask


def test_rewriting_a_file_keeps_its_mode_as_plain_open_does(tmp_path, umask):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    atomic_write_bytes(target, b"new")
    assert _mode(target) == 0o640 and target.read_bytes() == b"new"
