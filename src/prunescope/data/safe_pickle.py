"""A restricted unpickler for dataset files that are pickles of numpy arrays.

MNIST (``mnist.pkl.gz``) and CIFAR (``data_batch_*``, ``train``, ...) are distributed as Python
pickles, and a plain :func:`pickle.load` runs whatever code a tampered file names. The
:class:`SafeUnpickler` resolves only the globals needed to rebuild numpy arrays:

* ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``
  (``numpy.core`` is mapped to ``numpy._core`` on numpy 2, where the old path is deprecated),
* ``numpy.ndarray`` and ``numpy.dtype``,
* ``_codecs.encode``, which Python 3 writes into protocol 0-2 pickles for every ``bytes`` object;
  it is answered with a stand-in that only turns a ``str`` into latin-1 ``bytes`` (the real
  function is never handed out).

Any other global raises :class:`DataError` naming it, before anything is called.
"""

from __future__ import annotations

import pickle
from typing import IO, Any

import numpy as np

from prunescope.errors import DataError

_NUMPY_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


# numpy 2 moved ``numpy.core`` to ``numpy._core`` (the old path warns); numpy 1 has only the old.
if int(np.__version__.split(".")[0]) >= 2:
    _NUMPY_CORE_ALIASES = {"numpy.core.multiarray": "numpy._core.multiarray"}
else:
    _NUMPY_CORE_ALIASES = {"numpy._core.multiarray": "numpy.core.multiarray"}


class RefusedGlobal(pickle.UnpicklingError):
    """Raised by :class:`SafeUnpickler` for a global outside the allow-list."""


def _latin1_bytes(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode`` as protocol 0-2 pickles use it: ``str`` -> latin-1 bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise RefusedGlobal(f"_codecs.encode({type(text).__name__}, {encoding!r}, {errors!r})")
    return text.encode("latin1")


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy array reconstruction globals (see module doc)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) not in _NUMPY_GLOBALS:
            raise RefusedGlobal(f"{module}.{name}")
        return super().find_class(_NUMPY_CORE_ALIASES.get(module, module), name)


def safe_load(fileobj: IO[bytes], *, encoding: str, source: str | None = None) -> Any:
    """Unpickle ``fileobj`` with :class:`SafeUnpickler`.

    ``encoding`` is passed to the unpickler (``"latin1"`` or ``"bytes"`` for Python 2 pickles).
    A refused global, or a truncated or malformed pickle, raises :class:`DataError` naming
    ``source`` (default: ``fileobj.name``).
    """
    where = source or str(getattr(fileobj, "name", "<stream>"))
    try:
        return SafeUnpickler(fileobj, encoding=encoding).load()
    except RefusedGlobal as exc:
        raise DataError(
            f"refusing to unpickle {where}: it references {exc}, which is not a numpy array "
            "global; use an untampered copy of the dataset from its official source"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OSError, MemoryError) as exc:
        raise DataError(
            f"cannot unpickle {where} ({type(exc).__name__}: {one_line(exc)}); the file is "
            "truncated or corrupt: download it again"
        ) from None


def one_line(exc: BaseException) -> str:
    """``str(exc)`` with whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(exc).split())
