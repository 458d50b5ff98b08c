"""Stages: result caching and stage skipping, for every method, in one place.

A *stage* is one unit of work with a directory per output (the dense model; a method at one
sparsity; a pruned checkpoint). Its directories hold ``stage.json`` (the *key*: everything that
determines the result, written before the work starts) and ``result.json`` (written last, so a
stage with one is finished). Before running a stage :func:`run` compares keys:

- same key, finished: the result is read back, nothing runs;
- same key, unfinished: the work runs again and resumes from its checkpoints;
- another key, unfinished (e.g. a loss went NaN and the learning rate was lowered): the
  stale files are removed and the stage starts over, with a warning;
- another key, finished: refused with a ConfigError naming the first key that differs, its
  value on disk and the value asked for; nothing is written;
- files but no key (another program's, or an older prunescope's): refused; nothing is removed.

So a run directory only ever holds results of the configuration its ``stage.json`` files name,
adding a sparsity to a finished sweep runs only the new stages, and a finished dense model is
reused by every later stage of the same data, model, seed and training. Methods never see
this: they compute; :func:`run` decides.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prunescope import distributed
from prunescope.errors import ConfigError
from prunescope.files import write_json

KEY, RESULT = "stage.json", "result.json"
logger = logging.getLogger(__name__)


def finished(directory: Path) -> dict[str, Any] | None:
    """The result of a finished stage directory, else None."""
    path = directory / RESULT
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def check(directories: Sequence[Path], key: Mapping[str, Any]) -> None:
    """Raise the ConfigError :func:`run` would raise for this stage, writing nothing."""
    for directory in directories:
        _compare(directory, [normal(key)], resumable=True)


def run(directories: Sequence[Path], key: Mapping[str, Any],
        compute: Callable[[], Sequence[dict[str, Any]]], *,
        aliases: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """The stage's results, one per directory: read back when finished with the same key, else
    computed by ``compute()`` (which returns them in the same order) and written.

    ``aliases``: keys an older prunescope wrote for this same stage (a config keyed another
    way); a directory holding one of them holds this stage, and its key file is left as it is.
    Under torchrun rank 0 alone inspects, clears and writes; the other processes wait for it
    and then read the same decision from the files (so every process runs ``compute`` or none).
    """
    key = normal(key)
    names = [key, *(normal(alias) for alias in aliases)]
    if distributed.is_writer():
        held = [_compare(d, names, resumable=False) for d in directories]  # all raise first
        for directory, holds_key in zip(directories, held, strict=True):
            if not holds_key:
                write_json(directory / KEY, key)
    distributed.barrier()
    done = [finished(d) if _stored(d) in names else None for d in directories]
    if all(result is not None for result in done):
        return done  # type: ignore[return-value]
    results = list(compute())
    if len(results) != len(directories):
        raise RuntimeError(f"stage computed {len(results)} results for {len(directories)} "
                           "directories")
    for directory, result in zip(directories, results, strict=True):
        write_json(directory / RESULT, result)
    distributed.barrier()
    return results


def source_key(path: Path) -> dict[str, Any]:
    """A source file (e.g. the checkpoint a stage prunes) as part of a stage key: its resolved
    path and the SHA-256 of its content, so a source retrained in place is another stage."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(Path(path).resolve()), "sha256": digest.hexdigest()}


def _stored(directory: Path) -> dict[str, Any] | None:
    path = directory / KEY
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _compare(directory: Path, names: Sequence[dict[str, Any]], *, resumable: bool) -> bool:
    """True when ``directory`` holds this stage (finished or resumable) under one of its
    ``names`` (its key first, then its aliases); removes a stale unfinished stage (unless only
    checking); raises for a finished stage of another key."""
    if not directory.exists() or not any(directory.iterdir()):
        return False
    stored = _stored(directory)
    key = names[0]
    if stored in names:
        return True
    if stored is None or (directory / RESULT).is_file():
        raise ConfigError(_refusal(directory, stored, key))
    if not resumable:
        where, old, new = difference(stored, key)
        logger.warning("%s holds an unfinished run of another configuration (%s: %s on disk, "
                       "%s now); starting it over", directory, where, old, new)
        _clear(directory)
    return False


def _refusal(directory: Path, stored: dict[str, Any] | None, key: dict[str, Any]) -> str:
    if stored is None:
        return (f"{directory} is not empty and holds no stage key ({KEY}): files of an older "
                "prunescope or of your own; pass another --out, or delete it to run again")
    where, old, new = difference(stored, key)
    return (f"{directory} holds a finished run with {where}={_show(old)}, but this one asks "
            f"{where}={_show(new)}; pass another --out, or delete {directory} to replace it")


def difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[str, Any, Any]:
    """The first dotted key whose values differ, with both values: keys both sides have first,
    then keys one side lacks (shown as ``<missing>``)."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    shared = [k for k in flat_new if k in flat_old]
    for name in [*shared, *(k for k in flat_new if k not in flat_old),
                 *(k for k in flat_old if k not in flat_new)]:
        if flat_old.get(name, _MISSING) != flat_new.get(name, _MISSING):
            return name, flat_old.get(name, _MISSING), flat_new.get(name, _MISSING)
    return "", None, None


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        flat: dict[str, Any] = {}
        for name, value in tree.items():
            flat.update(_flatten(value, f"{prefix}.{name}" if prefix else str(name)))
        return flat
    return {prefix: tree}


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, _Missing) else json.dumps(value)


def normal(key: Mapping[str, Any]) -> dict[str, Any]:
    """The key as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(key, sort_keys=False, default=str))


def claim_config(path: Path, config: Mapping[str, Any], owner: str) -> None:
    """Write ``config`` to ``path`` (the config of files shared by several stages, e.g. a
    method's rounds), or check that ``path`` holds the same; another one is a ConfigError naming
    the first key that differs. ``owner`` names what the files belong to, for the message."""
    config = normal(config)
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored != config:
            name, old, new = difference(stored, config)
            raise ConfigError(
                f"{path.parent} holds files of {owner} with {name}={_show(old)}, but this run "
                f"asks {name}={_show(new)}; give it another name, pass another --out, or "
                f"delete {path.parent}")
        return
    write_json(path, config)


def _clear(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
