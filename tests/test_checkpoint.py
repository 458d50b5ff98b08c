"""Checkpoints: weights, mask, optimizer and RNG state in one safetensors file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pipeline_helpers import lenet, state_equal, tiny_mlp
from torch import nn

from prunescope import checkpoint
from prunescope.errors import CheckpointError
from prunescope.files import save_tensors
from prunescope.mask import Mask


def _batch(seed: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=generator), torch.randint(0, 3, (n,),
                                                                        generator=generator)


def _make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                               weight_decay=1e-3)
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    x, y = _batch(seed)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def _one_line(exc: pytest.ExceptionInfo[CheckpointError]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def test_round_trip_keeps_weights_mask_rng_and_meta(tmp_path):
    model = tiny_mlp()
    mask = Mask({"1.weight": torch.rand(12, 16) > 0.5, "3.weight": torch.rand(3, 12) > 0.3})
    generator = torch.Generator().manual_seed(5)
    rng = {"torch": torch.get_rng_state(), "loader": generator.get_state()}
    meta = {"epoch": 3, "step": 12, "metrics": {"val_accuracy": 0.5}, "note": "hello"}
    checkpoint.save(tmp_path / "c.safetensors", model, meta=meta, mask=mask, rng=rng)

    loaded = checkpoint.load(tmp_path / "c.safetensors")
    assert state_equal(loaded.model, model.state_dict())
    assert loaded.mask is not None and loaded.mask.equal(mask)
    assert state_equal(loaded.rng, rng)
    assert loaded.optimizer is None
    assert {k: loaded.meta[k] for k in meta} == meta
    assert loaded.meta["format"] == checkpoint.CHECKPOINT_FORMAT


def test_restored_rng_state_reproduces_random_draws(tmp_path):
    generator = torch.Generator().manual_seed(11)
    checkpoint.save(tmp_path / "c.safetensors", tiny_mlp(), meta={},
                    rng={"loader": generator.get_state()})
    expected = torch.randperm(50, generator=generator)
    restored = torch.Generator()
    restored.set_state(checkpoint.load(tmp_path / "c.safetensors").rng["loader"])
    assert torch.equal(torch.randperm(50, generator=restored), expected)


def test_checkpoint_without_mask_or_optimizer_loads_them_as_none(tmp_path):
    checkpoint.save(tmp_path / "c.safetensors", tiny_mlp(), meta={"epoch": 0})
    loaded = checkpoint.load(tmp_path / "c.safetensors")
    assert loaded.mask is None and loaded.optimizer is None and loaded.rng == {}


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_restored_optimizer_takes_identical_next_steps(tmp_path, kind):
    model = tiny_mlp(seed=1)
    optimizer = _make_optimizer(kind, model)
    for seed in range(3):
        _train_step(model, optimizer, seed)
    checkpoint.save(tmp_path / "c.safetensors", model, meta={}, optimizer=optimizer)

    loaded = checkpoint.load(tmp_path / "c.safetensors")
    fresh = tiny_mlp(seed=2)
    checkpoint.load_model_state(fresh, loaded.model, "c")
    fresh_optimizer = _make_optimizer(kind, fresh)
    fresh_optimizer.load_state_dict(loaded.optimizer)

    for seed in range(3, 6):
        _train_step(model, optimizer, seed)
        _train_step(fresh, fresh_optimizer, seed)
    assert state_equal(fresh.state_dict(), model.state_dict())


def test_sgd_momentum_buffers_survive_the_round_trip(tmp_path):
    model = tiny_mlp()
    optimizer = _make_optimizer("sgd", model)
    _train_step(model, optimizer, 0)
    checkpoint.save(tmp_path / "c.safetensors", model, meta={}, optimizer=optimizer)
    state = checkpoint.load(tmp_path / "c.safetensors").optimizer
    original = optimizer.state_dict()
    assert state["param_groups"] == original["param_groups"]
    assert state["state"].keys() == original["state"].keys()
    for index, entry in original["state"].items():
        assert torch.equal(state["state"][index]["momentum_buffer"], entry["momentum_buffer"])


def test_adamw_step_counters_survive_the_round_trip(tmp_path):
    model = tiny_mlp()
    optimizer = _make_optimizer("adamw", model)
    for seed in range(2):
        _train_step(model, optimizer, seed)
    checkpoint.save(tmp_path / "c.safetensors", model, meta={}, optimizer=optimizer)
    state = checkpoint.load(tmp_path / "c.safetensors").optimizer
    for index, entry in optimizer.state_dict()["state"].items():
        restored = state["state"][index]
        assert isinstance(restored["step"], torch.Tensor)
        assert torch.equal(restored["step"], entry["step"]) and float(restored["step"]) == 2.0
        assert torch.equal(restored["exp_avg"], entry["exp_avg"])
        assert torch.equal(restored["exp_avg_sq"], entry["exp_avg_sq"])


def test_build_model_rebuilds_a_registry_model_from_meta(tmp_path):
    model = lenet(seed=3)
    spec = checkpoint.model_spec(model, num_classes=10)
    assert spec == {"name": "lenet300", "num_classes": 10, "in_channels": 1, "image_size": 8}
    checkpoint.save(tmp_path / "c.safetensors", model, meta={"model": spec})

    rebuilt = checkpoint.build_model(checkpoint.load(tmp_path / "c.safetensors"), "c")
    assert type(rebuilt) is type(model)
    assert rebuilt.model_name == "lenet300" and rebuilt.input_shape == (1, 8, 8)
    assert state_equal(rebuilt.state_dict(), model.state_dict())


def test_model_spec_of_a_user_defined_model_is_none():
    assert checkpoint.model_spec(tiny_mlp(), num_classes=3) is None


def test_build_model_refuses_a_user_defined_model(tmp_path):
    checkpoint.save(tmp_path / "c.safetensors", tiny_mlp(), meta={"model": None})
    with pytest.raises(CheckpointError) as exc:
        checkpoint.build_model(checkpoint.load(tmp_path / "c.safetensors"), "c")
    assert "user-defined" in _one_line(exc)


def test_build_model_refuses_a_mask_that_does_not_fit(tmp_path):
    model = lenet()
    mask = Mask({"classifier.0.weight": torch.ones(3, 3, dtype=torch.bool)})
    checkpoint.save(tmp_path / "c.safetensors", model,
                    meta={"model": checkpoint.model_spec(model, 10)}, mask=mask)
    with pytest.raises(CheckpointError) as exc:
        checkpoint.build_model(checkpoint.load(tmp_path / "c.safetensors"), "c")
    _one_line(exc)


@pytest.mark.parametrize("other", ["different shapes", "different keys"])
def test_load_model_state_into_a_mismatched_model_is_one_line(tmp_path, other):
    checkpoint.save(tmp_path / "c.safetensors", lenet(), meta={})
    state = checkpoint.load(tmp_path / "c.safetensors").model
    if other == "different shapes":
        target = lenet()
        state = {k: v[..., :-1] if k.endswith("0.weight") else v for k, v in state.items()}
    else:
        target = tiny_mlp()
    with pytest.raises(CheckpointError) as exc:
        checkpoint.load_model_state(target, state, tmp_path / "c.safetensors")
    assert "c.safetensors" in _one_line(exc)


def test_load_refuses_a_file_with_another_format(tmp_path):
    save_tensors(tmp_path / "c.safetensors", {"model/w": torch.zeros(2)},
                 {"format": "someone.else/3"})
    with pytest.raises(CheckpointError) as exc:
        checkpoint.load(tmp_path / "c.safetensors")
    assert "someone.else/3" in _one_line(exc)


def test_load_refuses_a_mask_file_given_as_checkpoint(tmp_path):
    Mask({"w": torch.ones(2, dtype=torch.bool)}).save(tmp_path / "mask.safetensors")
    with pytest.raises(CheckpointError) as exc:
        checkpoint.load(tmp_path / "mask.safetensors")
    _one_line(exc)


def test_load_refuses_unexpected_tensor_groups(tmp_path):
    save_tensors(tmp_path / "c.safetensors", {"stray/w": torch.zeros(2)},
                 {"format": checkpoint.CHECKPOINT_FORMAT})
    with pytest.raises(CheckpointError) as exc:
        checkpoint.load(tmp_path / "c.safetensors")
    assert "stray/w" in _one_line(exc)


# -- compact storage of sparse checkpoints ----------------------------------------------------

def _lenet_mnist_pruned(sparsity: float) -> tuple[nn.Module, Mask]:
    """LeNet-300-100 for MNIST with ``sparsity`` of its weights pruned at random (exact zeros)."""
    from prunescope import models

    torch.manual_seed(0)
    model = models.build("lenet300")
    generator = torch.Generator().manual_seed(1)
    mask = Mask({name: torch.rand(p.shape, generator=generator) >= sparsity
                 for name, p in model.named_parameters() if name.endswith("weight")})
    mask.apply_(model)
    return model, mask


def test_a_90_percent_sparse_checkpoint_is_smaller_than_the_dense_one(tmp_path):
    model, mask = _lenet_mnist_pruned(0.9)
    checkpoint.save(tmp_path / "dense.safetensors", model, meta={})
    checkpoint.save(tmp_path / "sparse.safetensors", model, meta={}, mask=mask)
    dense = (tmp_path / "dense.safetensors").stat().st_size
    sparse = (tmp_path / "sparse.safetensors").stat().st_size
    assert sparse < 0.2 * dense, (sparse, dense)


def test_a_sparse_checkpoint_round_trips_exactly(tmp_path):
    model, mask = _lenet_mnist_pruned(0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checkpoint.save(tmp_path / "c.safetensors", model, meta={"epoch": 1}, mask=mask,
                    optimizer=optimizer)
    loaded = checkpoint.load(tmp_path / "c.safetensors")
    assert state_equal(loaded.model, model.state_dict())
    assert loaded.mask is not None and loaded.mask.equal(mask)
    assert loaded.meta["epoch"] == 1


def test_a_mask_file_is_stored_in_bits(tmp_path):
    _, mask = _lenet_mnist_pruned(0.5)
    mask.save(tmp_path / "mask.safetensors")
    assert (tmp_path / "mask.safetensors").stat().st_size < mask.num_total / 8 + 4096
    assert Mask.load(tmp_path / "mask.safetensors").equal(mask)


def test_checkpoints_and_masks_with_masks_stored_as_bool_bytes_still_load(tmp_path):
    import json

    from safetensors.torch import save_file

    from prunescope import files

    model, mask = _lenet_mnist_pruned(0.9)
    tensors = {**{f"model/{k}": v.contiguous() for k, v in model.state_dict().items()},
               **{f"mask/{k}": v for k, v in mask.items()}}
    meta = json.dumps({"format": checkpoint.CHECKPOINT_FORMAT})
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={files.META_KEY: meta})
    save_file(dict(mask.items()), str(tmp_path / "old-mask.safetensors"),
              metadata={files.META_KEY: json.dumps({"format": "prunescope.mask/1"})})
    loaded = checkpoint.load(tmp_path / "old.safetensors")
    assert state_equal(loaded.model, model.state_dict()) and loaded.mask.equal(mask)
    assert Mask.load(tmp_path / "old-mask.safetensors").equal(mask)
