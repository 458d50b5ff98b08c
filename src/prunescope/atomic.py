"""Replace a file atomically: write a temporary file in the same directory, flush it to disk,
rename it over the target. A killed process leaves the old file or the new one, never half of
one. Imports nothing beyond the standard library, so torch-free parts (the report) use it too;
:func:`prunescope.files.atomic_write_bytes` adds the rule that only rank 0 writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def replace_file(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating its directory if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
