"""Build, cache and load the fast sparse kernels; fall back to the reference path if that fails.

The C++ sources in ``csrc/`` are compiled on first use with the system's C++ compiler (``$CXX``,
else ``g++``/``c++``) against the installed torch, into a cache directory keyed by a hash of the
sources, the flags, the compiler and torch (``$PRUNESCOPE_CACHE``, else
``$XDG_CACHE_HOME/prunescope`` or ``~/.cache/prunescope``). ``make`` builds it during set-up
(``python -m prunescope.kernels``), so a test run or a job never waits for it; a cold build
takes about 20 s on two cores. Concurrent first uses are safe: builders serialise on a
``flock`` (released by the kernel if a builder dies) and the library appears by atomic rename.

No ``-march=native``: the kernels are compiled once per instruction set (the baseline x86-64,
AVX2+FMA, and AVX-512 F/DQ/VL) into one library, and the CPU's features pick one at run time (the
widest it has). On load, the chosen variant is checked against the reference on a small problem
and a failing one is not used.

``PRUNESCOPE_KERNELS`` selects: ``auto`` (default), ``avx512``, ``avx2``, ``generic``, or
``reference`` (the pure-PyTorch path, no compiler needed). Whenever the fast path is not used,
one line says so (a ``RuntimeWarning``) and everything still works, only slower.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
HEADERS = ("aligned.h", "table.h", "vec.h", "kernels.h")
# translation unit -> its instruction-set flags (the only place an ISA is chosen)
UNITS = {
    "ops.cpp": ["-fopenmp"],
    "kern_generic.cpp": [],
    "kern_avx2.cpp": ["-mavx2", "-mfma"],
    "kern_avx512.cpp": ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512vl"],
}
COMMON_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fno-math-errno", "-Wall", "-Wextra"]
LIBRARY = "libprunescope_kernels.so"
MODES = ("auto", "avx512", "avx2", "generic", "reference")


class BuildError(RuntimeError):
    """The kernels could not be compiled or loaded; the message is one line."""


@dataclass(frozen=True)
class Backend:
    """Which implementation the sparse modules run: ``name`` is ``avx512``, ``avx2``, ``generic`` or
    ``reference``; ``ops`` the loaded operators (None for reference); ``reason``
    why the fast path is not used (empty when it is)."""

    name: str
    ops: Any = None
    reason: str = ""

    @property
    def fast(self) -> bool:
        return self.ops is not None


_backend: Backend | None = None


def backend() -> Backend:
    """The backend for this process, building or loading the kernels on the first call."""
    global _backend
    if _backend is None:
        _backend = _select(os.environ.get("PRUNESCOPE_KERNELS", "auto").strip().lower() or "auto")
    return _backend


def reset() -> None:
    """Forget the chosen backend (tests use it with a changed ``PRUNESCOPE_KERNELS``)."""
    global _backend
    _backend = None


def _select(mode: str) -> Backend:
    if mode not in MODES:
        return _reference(f"PRUNESCOPE_KERNELS={mode!r} is not one of {', '.join(MODES)}")
    if mode == "reference":
        return _reference("PRUNESCOPE_KERNELS=reference")
    try:
        ops = load()
        name = ops.set_variant(mode)
    except (BuildError, RuntimeError, OSError) as exc:
        return _reference(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if not _self_check(ops):
        name = ops.set_variant("generic")
        if not _self_check(ops):
            return _reference("the compiled kernels disagree with the reference on a test problem")
        _warn(f"the {mode} kernels disagree with the reference; using the generic ones")
    return Backend(name, ops)


def _reference(reason: str) -> Backend:
    _warn(f"fast sparse kernels not used ({reason}); running the PyTorch reference path "
          "(correct, slower)")
    return Backend("reference", None, reason)


def _warn(message: str) -> None:
    warnings.warn(f"prunescope.kernels: {message}", RuntimeWarning, stacklevel=3)


# -- building -------------------------------------------------------------------------------------
def load() -> Any:
    """Build the library if needed, load it, return ``torch.ops.prunescope_kernels``."""
    path = library_path()
    if not path.exists():
        build(path)
    torch.ops.load_library(str(path))
    return torch.ops.prunescope_kernels


def cache_root() -> Path:
    explicit = os.environ.get("PRUNESCOPE_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prunescope"


def library_path() -> Path:
    """Where the library for these sources, flags, compiler and torch lives."""
    return cache_root() / f"kernels-{_key()}" / LIBRARY


def _compiler() -> str:
    for candidate in (os.environ.get("CXX"), "g++", "c++"):
        if candidate and shutil.which(candidate):
            return candidate
    raise BuildError("no C++ compiler found (set CXX, or install g++)")


def _key() -> str:
    digest = hashlib.sha256()
    for name in (*UNITS, *HEADERS):
        digest.update(name.encode() + (CSRC / name).read_bytes())
    compiler = _compiler()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"cannot run the compiler {compiler!r}: {exc}") from None
    digest.update(repr((UNITS, COMMON_FLAGS, _torch_flags(), compiler, version,
                        torch.__version__, sys.platform)).encode())
    return digest.hexdigest()[:16]


def _torch_flags() -> list[str]:
    root = Path(torch.__file__).resolve().parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-isystem", str(root / "include")]


def _link_flags() -> list[str]:
    lib = Path(torch.__file__).resolve().parent / "lib"
    return ["-shared", "-fopenmp", f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


def build(path: Path | None = None) -> Path:
    """Compile the library into ``path`` (default :func:`library_path`); returns the path.

    Serialised by a file lock; a library that appeared while waiting is used as is. Raises
    :class:`BuildError` with the compiler's first error line (the full log is kept beside).
    """
    path = path or library_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent / ".lock"):
        if path.exists():
            return path
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
            _compile_and_link(Path(tmp), path)
    return path


@contextlib.contextmanager
def _locked(lock: Path):
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile_and_link(tmp: Path, target: Path) -> None:
    compiler = _compiler()
    objects = {unit: tmp / (Path(unit).stem + ".o") for unit in UNITS}

    def compile_unit(unit: str) -> subprocess.CompletedProcess:
        command = [compiler, *COMMON_FLAGS, *UNITS[unit], *_torch_flags(), "-c",
                   str(CSRC / unit), "-o", str(objects[unit])]
        return subprocess.run(command, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = list(pool.map(compile_unit, UNITS))
    link = subprocess.run([compiler, *map(str, objects.values()), *_link_flags(), "-o",
                           str(tmp / LIBRARY)], capture_output=True, text=True) \
        if all(r.returncode == 0 for r in results) else None
    log = "\n".join(r.stderr for r in results) + (link.stderr if link else "")
    (target.parent / "build.log").write_text(log)
    failed = next((r for r in results if r.returncode != 0), None) or (
        link if link is not None and link.returncode != 0 else None)
    if failed is not None:
        first = next((line for line in failed.stderr.splitlines() if "error" in line),
                     failed.stderr.strip().splitlines()[0] if failed.stderr.strip() else "")
        raise BuildError(f"compiling the kernels failed: {first.strip()} "
                         f"(log: {target.parent / 'build.log'})")
    os.replace(tmp / LIBRARY, target)


# -- self-check -----------------------------------------------------------------------------------
def _self_check(ops: Any) -> bool:
    """Run a small Linear (its backward both fused and for the weight gradient alone) and two
    Conv2d (one batch innermost, one on NCHW planes: 17 columns fill their vectors), forward and
    backward, through ``ops`` and compare with the dense computation. Gradients are enabled for
    the check whatever the caller's mode: the first sparse layer may run under
    ``torch.inference_mode``."""
    with torch.inference_mode(False), torch.enable_grad():
        return _check_against_dense(ops)


def _check_against_dense(ops: Any) -> bool:
    from prunescope.kernels import formats

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(13, 37, generator=generator)
    weight[torch.rand(13, 37, generator=generator) < 0.7] = 0
    x, dy = torch.randn(21, 37, generator=generator), torch.randn(21, 13, generator=generator)
    lin = formats.compress(weight, weight != 0)
    y, saved = ops.linear_train_forward(x, lin.values, None, lin.ptr, lin.idx)
    dx, dw, _ = ops.linear_backward(dy, saved, 37, lin.values, lin.ptr, lin.idx, lin.cptr,
                                    lin.cperm, lin.crow, True, True, False)
    ok = _close(y, x @ weight.t()) and _close(ops.linear_forward(x, lin.values, None, lin.ptr,
                                                                 lin.idx), y)
    ok = ok and _close(dx, dy @ weight)
    ok = ok and _close(dw, (dy.t() @ x)[weight != 0])
    _, dw_alone, _ = ops.linear_backward(dy, saved, 37, lin.values, lin.ptr, lin.idx, lin.cptr,
                                         lin.cperm, lin.crow, False, True, False)
    ok = ok and _close(dw_alone, dw)
    conv = torch.randn(6, 4, 3, 3, generator=generator)
    conv[torch.rand(6, 4, 3, 3, generator=generator) < 0.6] = 0
    c = formats.compress(conv, conv != 0)
    geom = [4, 6, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    for width in (7, 17):
        xc = torch.randn(3, 4, 9, width, generator=generator).requires_grad_()
        dyc = torch.randn(3, 6, 9, width, generator=generator)
        yc, saved = ops.conv_forward(xc.detach(), c.values, None, c.ptr, c.idx, geom)
        dxc, dwc, _ = ops.conv_backward(dyc, saved, list(xc.shape), c.values, c.ptr, c.idx,
                                        c.cptr, c.cperm, c.crow, geom, True, True, False)
        dense = conv.clone().requires_grad_()
        expected = torch.nn.functional.conv2d(xc, dense, padding=1)
        expected.backward(dyc)
        ok = ok and _close(yc, expected) and _close(dxc, xc.grad)
        ok = ok and _close(dwc, dense.grad[conv != 0])
    return ok


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a - b).abs().max() <= 1e-4 * (1 + b.abs().max())).item())


def main() -> int:
    """``python -m prunescope.kernels``: build (or find) the kernels and say which will run."""
    start = time.perf_counter()
    chosen = backend()
    seconds = time.perf_counter() - start
    if chosen.fast:
        print(f"prunescope.kernels: {chosen.name} kernels ready in {seconds:.1f} s "
              f"({library_path()})")
    else:
        print(f"prunescope.kernels: reference path ({chosen.reason})")
    return 0

