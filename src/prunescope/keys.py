"""Which fields of a config a run's result key holds.

A stage's results are reused on resume only while the key they were written under still matches
(:meth:`prunescope.run.Run.key`, the methods' ``key``). A field added to a config after runs were
first keyed carries ``metadata=ADDED_LATER``: it is left out of the key while at its default,
which is what every run made before it existed did, so their results stay reusable; set to
anything else it is keyed as usual.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ADDED_LATER = {"added_later": True}


def key_fields(config: Any) -> dict[str, Any]:
    """``dataclasses.asdict(config)`` without the ADDED_LATER fields that are at their
    default."""
    fields = dataclasses.asdict(config)
    for f in dataclasses.fields(config):
        if f.metadata.get("added_later") and fields.get(f.name) == f.default:
            del fields[f.name]
    return fields
