"""Nested masks (ELSA's levels): invariants, level codes, the one-file checkpoint (issue 13)."""

from __future__ import annotations

import pytest
import torch
from pipeline_helpers import lenet

from prunescope import checkpoint, nested
from prunescope.errors import CheckpointError, PrunescopeError
from prunescope.mask import Mask
from prunescope.nested import NestedMask, NestedMaskError, load_at_level

T, F = True, False


def masks(*rows):
    return [Mask({"w": torch.tensor(row)}) for row in rows]


def test_level_codes_by_hand():
    # levels 0.75, 0.5, 0: weight 2 from the sparsest level, weight 0 from 0.5, the rest at 0
    nest = NestedMask((0.75, 0.5, 0.0), masks([F, F, T, F], [T, F, T, F], [T, T, T, T]))
    assert nest.codes()["w"].tolist() == [1, 2, 0, 2]
    assert nest.codes()["w"].dtype == torch.uint8
    assert nest.at(0.5).equal(Mask({"w": torch.tensor([T, F, T, F])}))
    assert NestedMask.from_codes(nest.levels, nest.codes()).equal(nest)


def test_a_weight_no_level_keeps_gets_the_code_past_the_last_level():
    nest = NestedMask((0.75, 0.5), masks([F, F, T, F], [T, F, T, F]))
    assert nest.codes()["w"].tolist() == [1, 2, 0, 2]
    assert NestedMask.from_codes(nest.levels, nest.codes()).equal(nest)


def test_random_nested_masks_round_trip_through_codes():
    generator = torch.Generator().manual_seed(3)
    scores = {"a": torch.rand(7, 5, generator=generator), "b": torch.rand(11, generator=generator)}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    levels = (0.9, 0.7, 0.4, 0.0)
    levels_masks = []
    for level in levels:  # keep the top (1 - level) scores: nested by construction
        threshold = flat.sort(descending=True).values[round((1 - level) * flat.numel()) - 1]
        levels_masks.append(Mask({n: s >= threshold for n, s in scores.items()}))
    nest = NestedMask(levels, levels_masks)
    back = NestedMask.from_codes(levels, nest.codes())
    assert back.equal(nest)
    for i in range(len(levels) - 1):  # each level a subset of the next
        for name in scores:
            assert not (back.masks[i][name] & ~back.masks[i + 1][name]).any()


@pytest.mark.parametrize(("levels", "rows", "message"), [
    ((0.5, 0.75), ([T, T, F, F], [T, F, F, F]), "strictly decreasing"),
    ((0.75, 0.75), ([T, F, F, F], [T, F, F, F]), "strictly decreasing"),
    ((0.75, 0.5), ([F, F, T, F], [T, T, F, F]), "not nested: level 0.75 keeps 1 weights"),
    ((0.75, 0.0), ([F, F, T, F], [T, T, T, F]), "level 0 must keep every weight"),
    ((1.0, 0.5), ([F, F, F, F], [T, T, F, F]), r"in \[0, 1\)"),
])
def test_bad_levels_are_one_clear_line(levels, rows, message):
    with pytest.raises(NestedMaskError, match=message) as info:
        NestedMask(levels, masks(*rows))
    assert "\n" not in str(info.value) and isinstance(info.value, PrunescopeError)


def test_a_level_not_held_names_the_levels_held():
    nest = NestedMask((0.75, 0.5, 0.0), masks([F, F, T, F], [T, F, T, F], [T, T, T, T]))
    with pytest.raises(NestedMaskError, match=r"level 0.9 is not held; .* holds 0.75, 0.5, 0$"):
        nest.at(0.9)


def test_codes_past_the_levels_are_refused():
    with pytest.raises(NestedMaskError, match="past the 2 levels"):
        NestedMask.from_codes((0.5, 0.0), {"w": torch.tensor([0, 3], dtype=torch.uint8)})


def nested_lenet():
    """lenet300 with levels 0.9, 0.5, 0 chosen by weight magnitude, and per-level biases."""
    model = lenet()
    weights = {n: p.detach() for n, p in model.named_parameters() if n.endswith("weight")}
    flat = torch.cat([w.abs().reshape(-1) for w in weights.values()])
    levels = (0.9, 0.5, 0.0)
    level_masks = []
    for level in levels:
        threshold = flat.sort(descending=True).values[round((1 - level) * flat.numel()) - 1]
        level_masks.append(Mask({n: w.abs() >= threshold for n, w in weights.items()}))
    rest = [{k: v + i for k, v in model.state_dict().items() if k not in weights}
            for i in range(len(levels) - 1)] + [None]
    return model, NestedMask(levels, level_masks), rest


def test_the_nested_checkpoint_round_trips_every_level(tmp_path):
    model, nest, rest = nested_lenet()
    path = tmp_path / "nested.safetensors"
    nested.save(path, model, nest, rest=rest,
                meta={"model": checkpoint.model_spec(model, 10), "data": None})
    state, back, back_rest, meta = nested.read(path)
    assert back.equal(nest) and meta["levels"] == [0.9, 0.5, 0.0]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert back_rest[2] == {}  # the densest level's rest is the model's own: not stored again
    for index, level in enumerate(nest.levels):
        loaded, mask = load_at_level(path, level)
        assert mask.equal(nest.masks[index])
        for name, value in loaded.state_dict().items():
            if name in mask:  # the dense weights where the level keeps them, else exactly zero
                expected = torch.where(mask[name], model.state_dict()[name], 0.0)
            else:
                expected = (rest[index] or model.state_dict())[name]
            assert torch.equal(value, expected), (level, name)


def test_the_nested_checkpoint_stores_two_bits_per_weight_besides_the_weights(tmp_path):
    model, nest, _ = nested_lenet()  # three levels ending at dense: codes 0..2 fit 2 bits
    path = tmp_path / "nested.safetensors"
    nested.save(path, model, nest, meta={"model": checkpoint.model_spec(model, 10)})
    dense = tmp_path / "dense.safetensors"
    checkpoint.save(dense, model, meta={"model": checkpoint.model_spec(model, 10)})
    assert nested.read(path)[3]["code_bits"] == 2
    extra = path.stat().st_size - dense.stat().st_size - nest.masks[0].num_total / 4
    assert 0 <= extra < 512  # the packed codes plus their header entries and the levels


def test_codes_pack_lowest_bits_first_by_hand():
    code = torch.tensor([[1, 2, 0], [3, 1, 2]], dtype=torch.uint8)
    packed = nested.pack_codes(code, 2)  # 1 + 2*4 + 0*16 + 3*64 = 201; 1 + 2*4 = 9 (padded)
    assert packed.tolist() == [201, 9]
    assert torch.equal(nested.unpack_codes(packed, 2, code.shape), code)
    assert nested.pack_codes(torch.tensor([1, 0, 1], dtype=torch.uint8), 1).tolist() == [5]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_packed_codes_round_trip(bits):
    generator = torch.Generator().manual_seed(bits)
    code = torch.randint(0, 2 ** bits, (7, 13), generator=generator).to(torch.uint8)
    packed = nested.pack_codes(code, bits)
    assert packed.numel() == -(-code.numel() // (8 // bits))
    assert torch.equal(nested.unpack_codes(packed, bits, code.shape), code)


@pytest.mark.parametrize(("levels", "bits"), [
    ((0.5, 0.0), 1), ((0.9, 0.5), 2), ((0.98, 0.95, 0.9, 0.0), 2), ((0.9, 0.8, 0.7, 0.6), 4)])
def test_code_bits_hold_the_largest_code(levels, bits):
    count = 10
    rows = [[i < round((1 - level) * count) for i in range(count)] for level in levels]
    assert nested.code_bits(NestedMask(levels, masks(*rows))) == bits


def test_a_format_1_file_with_unpacked_codes_still_reads(tmp_path):
    from prunescope.files import save_tensors

    model, nest, _ = nested_lenet()
    path = tmp_path / "v1.safetensors"
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"level/{k}": v for k, v in nest.codes().items()})
    save_tensors(path, tensors, {"model": checkpoint.model_spec(model, 10), "data": None,
                                 "format": "prunescope.nested/1", "levels": list(nest.levels)})
    assert nested.read(path)[1].equal(nest) and nested.is_nested(path)


def test_packed_codes_of_the_wrong_size_are_one_line(tmp_path):
    from prunescope.files import load_tensors, save_tensors

    model, nest, _ = nested_lenet()
    path = tmp_path / "nested.safetensors"
    nested.save(path, model, nest, meta={"model": checkpoint.model_spec(model, 10)})
    tensors, meta = load_tensors(path)
    name = next(k for k in tensors if k.startswith("level/"))
    tensors[name] = tensors[name][:-1]
    save_tensors(path, tensors, meta)
    with pytest.raises(CheckpointError, match="uint8 bytes") as info:
        nested.read(path)
    assert "\n" not in str(info.value)


def test_loading_a_level_not_held_or_another_file_is_one_line(tmp_path):
    model, nest, rest = nested_lenet()
    path = tmp_path / "nested.safetensors"
    nested.save(path, model, nest, rest=rest, meta={"model": checkpoint.model_spec(model, 10)})
    with pytest.raises(NestedMaskError, match="level 0.95 is not held"):
        load_at_level(path, 0.95)
    plain = tmp_path / "model.safetensors"
    checkpoint.save(plain, model, meta={})
    with pytest.raises(CheckpointError, match="is not a nested checkpoint"):
        load_at_level(plain, 0.9)


def test_saving_weights_the_densest_level_prunes_is_refused(tmp_path):
    model, _, _ = nested_lenet()
    weights = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    sparse = Mask({n: torch.zeros_like(model.state_dict()[n], dtype=torch.bool) for n in weights})
    with pytest.raises(NestedMaskError, match="apply its mask first"):
        nested.save(tmp_path / "x.safetensors", model, NestedMask((0.99,), [sparse]), meta={})
    assert not (tmp_path / "x.safetensors").exists()
