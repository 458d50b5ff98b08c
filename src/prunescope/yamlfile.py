"""Read a YAML recipe file, without importing torch.

The command line reads the recipe with :func:`read` before anything imports torch (seconds), so
a missing or malformed recipe is reported at once; :func:`prunescope.recipe.load` reads through
it too, so both say the same. Imports only the standard library, PyYAML and
:mod:`prunescope.errors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from prunescope.errors import ConfigError


def read(path: str | Path) -> Any:
    """The parsed YAML document of ``path`` (``{}`` for an empty file); whether it is a mapping
    is checked by :func:`prunescope.recipe.from_dict`.

    Raises :class:`ConfigError` (one line) when the file is missing, not UTF-8, or not YAML.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}; give the path of a YAML file (see recipes/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not UTF-8 text; give a YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"recipe {path} is not valid YAML{where}; fix the syntax") from None
    return raw if raw is not None else {}
