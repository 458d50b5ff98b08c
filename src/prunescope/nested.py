"""Nested masks: several sparse networks inside one dense one (ELSA, Halvachi et al. 2023).

A :class:`NestedMask` holds one :class:`~prunescope.mask.Mask` per *level*, the levels ordered
from the sparsest to the densest (e.g. 0.98, 0.95, 0.9, 0.0), each level's kept weights a subset
of the next denser level's. It is stored as one *level code* per weight (a uint8 tensor per
parameter): the index of the sparsest level that keeps the weight, or ``len(levels)`` for a
weight no level keeps. Level ``i`` keeps exactly the weights whose code is ``<= i``.

A *nested checkpoint* is one safetensors file (:func:`save`, format ``prunescope.nested/2``):

- ``model/<key>``: the state dict of the densest level (the dense weights);
- ``level/<parameter>``: the level codes, packed ``8 // code_bits`` to a byte (the metadata's
  ``code_bits``: the fewest of 1, 2, 4, 8 bits that hold the largest code; 2 bits for four
  levels ending at dense), lowest bits first, flat in row-major order, the last byte padded
  with zeros. Format ``prunescope.nested/1`` (one uint8 code per weight, unpacked) still
  reads;
- ``rest/<i>/<key>``: level ``i``'s tensors outside the mask (biases, batch-norm parameters and
  statistics) where they differ from the densest level's: each level's network is then exactly
  the one that was trained and evaluated at that level;
- metadata: the levels, their actual sparsities, how to rebuild the model and reload the data.

:func:`load_at_level` returns the model of any level held: the dense weights with the level's
pruned weights zeroed and its own other tensors. Nothing is pickled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunescope import checkpoint
from prunescope.errors import CheckpointError, ConfigError, PrunescopeError
from prunescope.files import load_tensors, read_meta, save_tensors
from prunescope.mask import Mask

NESTED_FORMAT = "prunescope.nested/2"
NESTED_FORMATS = ("prunescope.nested/1", NESTED_FORMAT)  # /1: unpacked uint8 codes
CODE_BITS = (1, 2, 4, 8)
MAX_LEVELS = 255  # codes are uint8 and code len(levels) means "kept by no level"
TOLERANCE = 1e-9  # how close a requested sparsity must be to a level


class NestedMaskError(ConfigError):
    """Levels that are not nested, not ordered, or not held."""


class NestedMask:
    """Masks at several sparsity levels, each a subset of the next denser one; immutable.

    ``levels`` are sparsities in strictly decreasing order (the sparsest first); ``masks[i]`` is
    level ``i``'s mask, all over the same tensors of the same shapes, ``masks[i]`` a subset of
    ``masks[i + 1]``. A level of sparsity 0 must keep every weight.
    """

    def __init__(self, levels: Sequence[float], masks: Sequence[Mask]) -> None:
        self.levels = _check_levels(levels)
        if len(masks) != len(self.levels):
            raise NestedMaskError(f"{len(self.levels)} levels need {len(self.levels)} masks, "
                                  f"got {len(masks)}")
        self.masks = tuple(masks)
        _check_nested(self.levels, self.masks)

    # -- construction from and to level codes -------------------------------------------------
    @classmethod
    def from_codes(cls, levels: Sequence[float], codes: Mapping[str, torch.Tensor]
                   ) -> NestedMask:
        """Inverse of :meth:`codes`: level ``i`` keeps the weights whose code is ``<= i``."""
        levels = _check_levels(levels)
        for name, code in codes.items():
            if code.dtype != torch.uint8:
                raise NestedMaskError(f"level code of {name!r} must be uint8, got {code.dtype}")
            if code.numel() and int(code.max()) > len(levels):
                raise NestedMaskError(f"level code of {name!r} reaches {int(code.max())}, past "
                                      f"the {len(levels)} levels held")
        return cls(levels, [Mask({n: c <= i for n, c in codes.items()})
                            for i in range(len(levels))])

    def codes(self) -> dict[str, torch.Tensor]:
        """``{parameter: uint8 tensor}``: the index of the sparsest level keeping each weight
        (``len(levels)`` for a weight that no level keeps)."""
        result = {}
        for name in self.masks[0]:
            code = torch.full(self.masks[0][name].shape, len(self.levels), dtype=torch.uint8)
            for i in reversed(range(len(self.levels))):
                code[self.masks[i][name].cpu()] = i
            result[name] = code
        return result

    # -- access -------------------------------------------------------------------------------
    def index(self, sparsity: float) -> int:
        """The index of the level ``sparsity``; NestedMaskError naming the levels held."""
        for i, level in enumerate(self.levels):
            if abs(level - sparsity) <= TOLERANCE:
                return i
        raise NestedMaskError(f"level {sparsity:g} is not held; this nested mask holds "
                              f"{describe(self.levels)}")

    def at(self, sparsity: float) -> Mask:
        """The mask of level ``sparsity``."""
        return self.masks[self.index(sparsity)]

    def __len__(self) -> int:
        return len(self.levels)

    def __repr__(self) -> str:
        actual = ", ".join(f"{m.sparsity:.4f}" for m in self.masks)
        return f"NestedMask(levels {describe(self.levels)}; actual sparsities {actual})"

    def equal(self, other: NestedMask) -> bool:
        return self.levels == other.levels and all(
            a.equal(b) for a, b in zip(self.masks, other.masks, strict=True))


def describe(levels: Sequence[float]) -> str:
    return ", ".join(f"{level:g}" for level in levels)


def _check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    levels = tuple(float(level) for level in levels)
    if not levels:
        raise NestedMaskError("a nested mask needs at least one level")
    if len(levels) > MAX_LEVELS:
        raise NestedMaskError(f"at most {MAX_LEVELS} levels, got {len(levels)}")
    for level in levels:
        if not 0.0 <= level < 1.0:
            raise NestedMaskError(f"each level is a sparsity in [0, 1), got {level:g}")
    for sparser, denser in zip(levels, levels[1:], strict=False):
        if not denser < sparser:
            raise NestedMaskError(
                f"levels must be strictly decreasing sparsities (the sparsest first), got "
                f"{describe(levels)}: {denser:g} follows {sparser:g}")
    return levels


def _check_nested(levels: tuple[float, ...], masks: tuple[Mask, ...]) -> None:
    first = masks[0]
    for level, mask in zip(levels, masks, strict=True):
        if mask.keys() != first.keys() or any(
                mask[n].shape != first[n].shape for n in first):
            raise NestedMaskError(f"the mask of level {level:g} covers other tensors or shapes "
                                  "than the first level's; every level masks the same tensors")
        if level == 0.0 and mask.num_kept != mask.num_total:
            raise NestedMaskError(f"level 0 must keep every weight; its mask prunes "
                                  f"{mask.num_total - mask.num_kept}")
    for i in range(len(masks) - 1):
        sparse, dense = masks[i], masks[i + 1]
        for name in sparse:
            outside = int((sparse[name] & ~dense[name].to(sparse[name].device)).sum())
            if outside:
                raise NestedMaskError(
                    f"levels are not nested: level {levels[i]:g} keeps {outside} weights of "
                    f"{name!r} that the denser level {levels[i + 1]:g} prunes")


# -- files -------------------------------------------------------------------------------------
def save(path: str | os.PathLike, model: nn.Module, nested: NestedMask, *,
         rest: Sequence[Mapping[str, torch.Tensor]] | None = None,
         meta: Mapping[str, Any]) -> None:
    """Write a nested checkpoint atomically (see the module docstring).

    ``model`` holds the densest level's weights; ``rest[i]`` is level ``i``'s state outside the
    mask (missing or None: the model's own). The densest level's pruned weights must be zero in
    ``model`` (the file stores them as they are).
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    densest = nested.masks[-1]
    for name, keep in densest.items():
        if name not in state:
            raise NestedMaskError(f"the nested mask names {name!r}, which the model does not have")
        if state[name][~keep.cpu()].any():
            raise NestedMaskError(f"{name!r} has nonzero weights the densest level "
                                  f"{nested.levels[-1]:g} prunes; apply its mask first")
    tensors = {f"model/{k}": v for k, v in state.items()}
    bits = code_bits(nested)
    tensors.update({f"level/{k}": pack_codes(v, bits) for k, v in nested.codes().items()})
    for i, level_rest in enumerate(rest or ()):
        for key, value in (level_rest or {}).items():
            if key in densest or key not in state:
                raise NestedMaskError(f"rest of level {nested.levels[i]:g} names {key!r}, "
                                      "which is a masked weight or not in the model")
            if not torch.equal(value.detach().cpu(), state[key]):
                tensors[f"rest/{i}/{key}"] = value.detach().cpu()
    full = {**meta, "format": NESTED_FORMAT, "levels": list(nested.levels), "code_bits": bits,
            "actual_sparsities": [m.sparsity for m in nested.masks]}
    save_tensors(path, tensors, full)


def code_bits(nested: NestedMask) -> int:
    """The fewest of 1, 2, 4, 8 bits that hold every level code of ``nested`` (its largest
    code is ``len(levels) - 1`` when the densest level keeps every weight, else
    ``len(levels)``)."""
    largest = len(nested.levels) - (1 if nested.levels[-1] == 0.0 else 0)
    return next(bits for bits in CODE_BITS if largest < 2 ** bits)


def pack_codes(code: torch.Tensor, bits: int) -> torch.Tensor:
    """Level codes (uint8, any shape) packed ``8 // bits`` to a byte, lowest bits first, flat;
    the last byte padded with zeros. Inverse: :func:`unpack_codes`."""
    per = 8 // bits
    flat = code.reshape(-1).to(torch.int32)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % per)]).reshape(-1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (flat << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: torch.Size) -> torch.Tensor:
    """The uint8 level codes of ``shape`` that :func:`pack_codes` packed with ``bits``;
    NestedMaskError when ``packed`` has the wrong size or type."""
    per, numel = 8 // bits, shape.numel()
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-numel // per):
        raise NestedMaskError(f"packed level codes of {numel} weights at {bits} bits need "
                              f"{-(-numel // per)} uint8 bytes, got {packed.numel()} "
                              f"{packed.dtype}")
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & (2 ** bits - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8).reshape(shape)


def is_nested(path: str | os.PathLike) -> bool:
    """True when ``path`` is a nested checkpoint (reads only its header)."""
    return read_meta(path).get("format") in NESTED_FORMATS


def read(path: str | os.PathLike
         ) -> tuple[dict[str, torch.Tensor], NestedMask, list[dict[str, torch.Tensor]], dict]:
    """``(dense state dict, nested mask, rest per level, metadata)`` of a nested checkpoint;
    CheckpointError for any other or a corrupt file."""
    tensors, meta = load_tensors(path)
    if meta.get("format") not in NESTED_FORMATS:
        raise CheckpointError(
            f"{path} is not a nested checkpoint (format {meta.get('format')!r}); levels are "
            "held only by the nested.safetensors an elsa run writes")
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "level": {}, "rest": {}}
    for key, tensor in tensors.items():
        group, _, name = key.partition("/")
        if group not in groups:
            raise CheckpointError(f"{path} has an unexpected tensor {key!r}")
        groups[group][name] = tensor
    try:
        codes = groups["level"]
        if meta["format"] != NESTED_FORMATS[0]:
            bits = int(meta["code_bits"])
            if bits not in CODE_BITS:
                raise NestedMaskError(f"code_bits must be one of {CODE_BITS}, got {bits}")
            codes = {name: unpack_codes(packed, bits, groups["model"][name].shape)
                     for name, packed in codes.items()}
        nested = NestedMask.from_codes(meta["levels"], codes)
        rest: list[dict[str, torch.Tensor]] = [{} for _ in nested.levels]
        for key, tensor in groups["rest"].items():
            index, _, name = key.partition("/")
            rest[int(index)][name] = tensor
    except (PrunescopeError, KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{path} holds invalid levels: {exc}") from None
    return groups["model"], nested, rest, meta


def load_at_level(path: str | os.PathLike, sparsity: float) -> tuple[nn.Module, Mask]:
    """The registry model of a nested checkpoint at level ``sparsity`` and that level's mask:
    the dense weights with the level's pruned weights zeroed and the level's other tensors.
    A level the file does not hold raises NestedMaskError naming the ones it holds."""
    state, nested, rest, meta = read(path)
    index = nested.index(sparsity)
    mask = nested.masks[index]
    level_state = {**state, **rest[index]}
    model = checkpoint.build_model(checkpoint.Checkpoint(model=level_state, meta=meta, mask=mask),
                                   path)
    mask.apply_(model)
    return model, mask


def levels_of(path: str | os.PathLike) -> tuple[float, ...]:
    """The levels a nested checkpoint holds (reads only its header)."""
    meta = read_meta(path)
    if meta.get("format") != NESTED_FORMAT:
        raise CheckpointError(f"{path} is not a nested checkpoint (format "
                              f"{meta.get('format')!r})")
    return tuple(meta["levels"])


def inspect(path: str | os.PathLike, sparsity: float | None = None) -> dict[str, Any]:
    """What a nested checkpoint holds, in the shape of :func:`prunescope.export.inspect` (its
    ``layers`` those of level ``sparsity``, default the sparsest) plus ``levels``: each level's
    kept, total and sparsity. Loads no data."""
    path = Path(path)
    _, nested, _, meta = read(path)
    index = 0 if sparsity is None else nested.index(sparsity)
    layers = [{"name": n, "shape": list(k.shape), "kept": int(k.count_nonzero()),
               "total": k.numel(), "sparsity": 1.0 - int(k.count_nonzero()) / k.numel()}
              for n, k in nested.masks[index].items()]
    levels = [{"level": level, "kept": m.num_kept, "total": m.num_total, "sparsity": m.sparsity}
              for level, m in zip(nested.levels, nested.masks, strict=True)]
    chosen = levels[index]
    return {"path": str(path), "bytes": path.stat().st_size, "kind": "checkpoint",
            "format": NESTED_FORMAT, "model": meta.get("model"), "data": meta.get("data"),
            "epoch": None, "step": None, "has_mask": True, "level": nested.levels[index],
            "layers": layers, "kept": chosen["kept"], "total": chosen["total"],
            "sparsity": chosen["sparsity"], "levels": levels}


def format_levels(info: Mapping[str, Any]) -> str:
    """The ``levels`` of :func:`inspect` as lines for people."""
    lines = ["", f"levels (layers above: level {info['level']:g})",
             f"{'level':<8} {'kept/total':>21}  sparsity"]
    for x in info["levels"]:
        counts = f"{x['kept']:,}/{x['total']:,}"
        lines.append(f"{x['level']:<8g} {counts:>21}  {x['sparsity']:.4f}")
    return "\n".join(lines)
