"""Tests of prunescope.mask: validation, counts, applying, files, torch.nn.utils.prune interop."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import prune as torch_prune

from prunescope.errors import CheckpointError, PruningError
from prunescope.files import save_tensors
from prunescope.mask import Mask

T, F = True, False


def hand_mask() -> Mask:
    return Mask({"a": torch.tensor([[T, F], [T, T]]), "b": torch.tensor([F, F, T, F])})


def random_mask(model: nn.Module, seed: int = 0, density: float = 0.5) -> Mask:
    generator = torch.Generator().manual_seed(seed)
    return Mask({
        name: torch.rand(param.shape, generator=generator) < density
        for name, param in model.named_parameters() if name.endswith("weight")
    })


class _TouchOnUnpickle:
    """Unpickling this object creates the file ``path`` (a stand-in for arbitrary code)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


# -- validation and counts -------------------------------------------------------------------
@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(3, dtype=torch.int64), [True, False]])
def test_rejects_non_bool_tensors(bad) -> None:
    with pytest.raises(PruningError, match="bool tensor"):
        Mask({"w": bad})


def test_rejects_empty_mask() -> None:
    with pytest.raises(PruningError):
        Mask({})


def test_counts_on_hand_made_mask() -> None:
    mask = hand_mask()
    assert mask.num_total == 8
    assert mask.num_kept == 4
    assert mask.sparsity == 0.5
    assert mask.density == 0.5
    assert mask.sparsities() == {"a": 0.25, "b": 0.75}
    assert list(mask) == ["a", "b"] and len(mask) == 2


def test_ones_and_from_weights_cover_default_targets(tiny_mlp: nn.Module) -> None:
    ones = Mask.ones(tiny_mlp)
    assert list(ones) == ["1.weight", "3.weight"] and ones.sparsity == 0.0
    with torch.no_grad():
        tiny_mlp[1].weight[0, :2] = 0.0
    assert Mask.from_weights(tiny_mlp).num_kept == 18 - 2
    with pytest.raises(PruningError, match="no parameter"):
        Mask.ones(tiny_mlp, ["9.weight"])


# -- applying --------------------------------------------------------------------------------
def test_apply_sets_pruned_weights_to_positive_zero(tiny_mlp: nn.Module) -> None:
    with torch.no_grad():
        tiny_mlp[1].weight.copy_(-torch.rand(3, 4) - 0.5)  # all negative
        tiny_mlp[1].weight[0, 0] = float("nan")  # pruned below
        tiny_mlp[1].weight[1, 1] = float("nan")  # kept below
        tiny_mlp[3].weight.fill_(float("nan"))
    before = copy.deepcopy(tiny_mlp)
    keep1 = torch.tensor([[F, T, F, T], [T, T, F, F], [F, F, T, T]])
    mask = Mask({"1.weight": keep1, "3.weight": torch.tensor([[T, F, F], [F, T, F]])})
    assert mask.apply_(tiny_mlp) is tiny_mlp
    for name, keep in mask.items():
        pruned = tiny_mlp.get_parameter(name)[~keep]
        assert torch.all(pruned == 0.0) and not torch.signbit(pruned).any()
    assert torch.isnan(tiny_mlp[1].weight[1, 1])  # a kept NaN stays: apply_ only prunes
    assert torch.all(torch.isnan(tiny_mlp[3].weight[mask["3.weight"]]))
    kept = tiny_mlp[1].weight[keep1 & ~before[1].weight.isnan()]
    assert torch.equal(kept, before[1].weight[keep1 & ~before[1].weight.isnan()])


def test_mask_grads_zeroes_pruned_gradients_only(tiny_mlp: nn.Module) -> None:
    mask = random_mask(tiny_mlp)
    tiny_mlp(torch.randn(5, 4)).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in tiny_mlp.named_parameters()}
    mask.mask_grads_(tiny_mlp)
    for name, param in tiny_mlp.named_parameters():
        if name in mask:
            assert torch.all(param.grad[~mask[name]] == 0)
            assert torch.equal(param.grad[mask[name]], grads[name][mask[name]])
        else:
            assert torch.equal(param.grad, grads[name])


def test_mask_grads_skips_parameters_without_grad(tiny_mlp: nn.Module) -> None:
    random_mask(tiny_mlp).mask_grads_(tiny_mlp)
    assert all(p.grad is None for p in tiny_mlp.parameters())


def test_resolve_names_the_missing_parameter(tiny_mlp: nn.Module) -> None:
    with pytest.raises(PruningError, match="'2.weight'"):
        Mask({"2.weight": torch.ones(3, 4, dtype=torch.bool)}).apply_(tiny_mlp)


def test_zero_on_resolved_parameters_matches_apply(tiny_mlp: nn.Module) -> None:
    mask = random_mask(tiny_mlp)
    other = copy.deepcopy(tiny_mlp)
    mask.zero_(mask.resolve(tiny_mlp))
    mask.apply_(other)
    assert all(torch.equal(a, b) for a, b in zip(tiny_mlp.parameters(), other.parameters(),
                                                 strict=True))


def test_check_catches_wrong_name(tiny_mlp: nn.Module) -> None:
    with pytest.raises(PruningError, match="does not have"):
        Mask({"2.weight": torch.ones(3, 4, dtype=torch.bool)}).check(tiny_mlp)


def test_check_catches_wrong_shape(tiny_mlp: nn.Module) -> None:
    with pytest.raises(PruningError, match="shape"):
        Mask({"1.weight": torch.ones(4, 3, dtype=torch.bool)}).check(tiny_mlp)
    random_mask(tiny_mlp).check(tiny_mlp)  # the right mask passes


def test_equal_compares_names_and_values() -> None:
    assert hand_mask().equal(hand_mask())
    assert not hand_mask().equal(Mask({"a": hand_mask()["a"]}))
    assert not hand_mask().equal(Mask({**hand_mask(), "b": torch.tensor([F, F, T, T])}))


# -- files -----------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "mask.safetensors"
    hand_mask().save(path)
    loaded = Mask.load(path)
    assert loaded.equal(hand_mask())
    assert all(t.dtype == torch.bool for t in loaded.values())
    assert [p.name for p in path.parent.iterdir()] == ["mask.safetensors"]  # no temp left


def test_round_trip_when_header_length_starts_with_pickle_byte(tmp_path: Path) -> None:
    # A safetensors file opens with its 8-byte little-endian header length; a length of
    # 128 mod 256 makes the first byte 0x80, the pickle magic, which must not be refused.
    path = tmp_path / "mask.safetensors"
    for length in range(1, 300):
        mask = Mask({"w" * length: torch.ones(2, dtype=torch.bool)})
        mask.save(path)
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert Mask.load(path).equal(mask)


def test_load_refuses_other_prunescope_files(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_tensors(path, {"a": torch.ones(2, dtype=torch.bool)}, {"format": "something else"})
    with pytest.raises(CheckpointError, match="not a prunescope mask"):
        Mask.load(path)


def test_load_refuses_foreign_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"a": torch.ones(2, dtype=torch.bool)}, str(path))
    with pytest.raises(CheckpointError, match="not written by prunescope"):
        Mask.load(path)


def test_load_refuses_non_bool_mask_tensors(tmp_path: Path) -> None:
    path = tmp_path / "float.safetensors"
    save_tensors(path, {"a": torch.ones(2)}, {"format": "prunescope.mask/1"})
    with pytest.raises(CheckpointError, match="invalid mask"):
        Mask.load(path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_load_refuses_random_bytes(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(seed))
                     .to(torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError):
        Mask.load(path)


def test_load_refuses_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "mask.safetensors"
    hand_mask().save(path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError):
        Mask.load(path)


def test_load_refuses_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        Mask.load(tmp_path / "missing.safetensors")


def _torch_load(path: Path) -> object:
    return torch.load(path, weights_only=False)


def _pickle_load(path: Path) -> object:
    return pickle.loads(path.read_bytes())


@pytest.mark.parametrize(
    ("write", "unpickle"),
    [
        (lambda obj, path: torch.save(obj, path), _torch_load),
        (lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=False),
         _torch_load),
        (lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2)), _pickle_load),
        (lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=5)), _pickle_load),
        (lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=0)), _pickle_load),
    ],
    ids=["torch.save", "torch.save-legacy", "pickle-2", "pickle-5", "pickle-0"],
)
def test_load_never_unpickles(tmp_path: Path, write, unpickle) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "mask.pt"
    write({"a": _TouchOnUnpickle(marker)}, path)
    with pytest.raises(CheckpointError):
        Mask.load(path)
    assert not marker.exists()
    unpickle(path)  # the payload is live: unpickling it for real does create the marker
    assert marker.exists()


# -- torch.nn.utils.prune interop ------------------------------------------------------------
def test_from_torch_prune_reads_exactly_the_mask_buffers(tiny_mlp: nn.Module) -> None:
    torch_prune.l1_unstructured(tiny_mlp[1], "weight", amount=0.5)
    mask = Mask.from_torch_prune(tiny_mlp)
    assert list(mask) == ["1.weight"]
    assert torch.equal(mask["1.weight"], tiny_mlp[1].weight_mask.bool())
    assert mask.num_kept == 6


def test_from_torch_prune_after_global_unstructured(tiny_mlp: nn.Module) -> None:
    pairs = [(tiny_mlp[1], "weight"), (tiny_mlp[3], "weight")]
    torch_prune.global_unstructured(pairs, torch_prune.L1Unstructured, amount=9)
    mask = Mask.from_torch_prune(tiny_mlp)
    assert list(mask) == ["1.weight", "3.weight"]
    assert torch.equal(mask["1.weight"], tiny_mlp[1].weight_mask.bool())
    assert torch.equal(mask["3.weight"], tiny_mlp[3].weight_mask.bool())
    assert mask.num_kept == 9


def test_from_torch_prune_after_remove_reads_nonzero_weights(tiny_mlp: nn.Module) -> None:
    pairs = [(tiny_mlp[1], "weight"), (tiny_mlp[3], "weight")]
    torch_prune.global_unstructured(pairs, torch_prune.L1Unstructured, amount=0.5)
    with_buffers = Mask.from_torch_prune(tiny_mlp)
    for module, name in pairs:
        torch_prune.remove(module, name)
    assert not any(n.endswith("_mask") for n, _ in tiny_mlp.named_buffers())
    assert Mask.from_torch_prune(tiny_mlp).equal(with_buffers)


def test_to_torch_prune_round_trip_matches_apply(tiny_mlp: nn.Module) -> None:
    keys = set(tiny_mlp.state_dict())
    mask = random_mask(tiny_mlp, seed=3)
    reference = mask.apply_(copy.deepcopy(tiny_mlp))
    mask.to_torch_prune(tiny_mlp)
    assert {"1.weight_orig", "1.weight_mask", "3.weight_orig"} <= set(tiny_mlp.state_dict())
    assert Mask.from_torch_prune(tiny_mlp).equal(mask)
    inputs = torch.randn(16, 4)
    with torch.no_grad():
        assert torch.equal(tiny_mlp(inputs), reference(inputs))
    torch_prune.remove(tiny_mlp[1], "weight")
    torch_prune.remove(tiny_mlp[3], "weight")
    assert set(tiny_mlp.state_dict()) == keys  # torch re-registers them last
    with torch.no_grad():
        assert torch.equal(tiny_mlp(inputs), reference(inputs))
    assert Mask.from_weights(tiny_mlp).equal(mask)


def test_to_torch_prune_checks_the_model(tiny_mlp: nn.Module) -> None:
    with pytest.raises(PruningError):
        Mask({"1.weight": torch.ones(2, 2, dtype=torch.bool)}).to_torch_prune(tiny_mlp)


# -- exact shapes and tied parameters --------------------------------------------------------
def test_a_mask_that_only_broadcasts_is_refused_on_every_path(tiny_mlp: nn.Module) -> None:
    mask = Mask({"1.weight": torch.tensor([[True], [False], [True]])})  # (3, 1) for (3, 4)
    for use in (mask.check, mask.apply_, mask.mask_grads_, mask.resolve,
                lambda m: mask.zero_({"1.weight": m[1].weight})):
        with pytest.raises(PruningError, match=r"'1\.weight'.*\(3, 1\).*\(3, 4\)"):
            use(tiny_mlp)
    assert tiny_mlp[1].weight.count_nonzero() == 12  # nothing was zeroed


def test_a_mask_of_another_shape_is_one_pruning_error(tiny_mlp: nn.Module) -> None:
    with pytest.raises(PruningError, match=r"exactly its parameter's shape"):
        Mask({"1.weight": torch.ones(4, 3, dtype=torch.bool)}).apply_(tiny_mlp)


class TiedLM(nn.Module):
    """An embedding and an output layer sharing one weight (as in weight-tied language models)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


@pytest.mark.parametrize("alias", ["embed.weight", "head.weight"])
def test_a_mask_may_name_either_alias_of_a_tied_weight(alias: str) -> None:
    model = TiedLM()
    keep = torch.rand(5, 3, generator=torch.Generator().manual_seed(0)) < 0.5
    mask = Mask({alias: keep})
    assert mask.resolve(model)[alias] is model.embed.weight
    mask.apply_(model)
    assert torch.equal(model.head.weight != 0, keep)
    assert Mask.from_weights(model, [alias]).equal(mask)


def test_a_mask_naming_both_aliases_must_agree() -> None:
    model = TiedLM()
    keep = torch.ones(5, 3, dtype=torch.bool)
    Mask({"embed.weight": keep, "head.weight": keep}).check(model)
    with pytest.raises(PruningError, match=r"'embed\.weight' and 'head\.weight'.*tied"):
        Mask({"embed.weight": keep, "head.weight": ~keep}).check(model)


def test_a_tied_model_prunes_through_its_linear_alias() -> None:
    import prunescope

    model = TiedLM()
    mask = prunescope.prune(model, "magnitude", "global", 0.6)
    assert list(mask) == ["head.weight"]
    assert int(model.embed.weight.count_nonzero()) == mask.num_kept == 6
