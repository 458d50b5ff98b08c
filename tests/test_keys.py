"""Tests of prunescope.keys: fields added to a config after runs were first keyed stay out of
the key at their default (old run directories keep their results) and are keyed otherwise."""

from __future__ import annotations

from dataclasses import dataclass, field

from prunescope.keys import ADDED_LATER, key_fields
from prunescope.methods.elsa import ELSA


@dataclass
class Config:
    lr: float = 0.1
    new: str = field(default="old behaviour", metadata=ADDED_LATER)


def test_a_later_field_is_keyed_only_away_from_its_default():
    assert key_fields(Config()) == {"lr": 0.1}
    assert key_fields(Config(lr=0.5)) == {"lr": 0.5}
    assert key_fields(Config(new="other")) == {"lr": 0.1, "new": "other"}


def test_elsa_keys_start_only_when_it_is_not_dense():
    assert "start" not in ELSA().key()
    key = ELSA(start="init", admission="regrow").key()
    assert key["start"] == "init" and key["admission"] == "regrow"
