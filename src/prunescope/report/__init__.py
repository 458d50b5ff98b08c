"""The audit report: ``audit.json`` -> one self-contained HTML page (no torch, no network).

:func:`render` turns an audit dictionary (:func:`prunescope.audit.run_audit`) into HTML whose
figures are PNG data URIs drawn with matplotlib's Agg backend; the page loads no script, style
sheet, font or image from anywhere. :func:`rerender` reads an ``audit.json`` (refusing one of
another version) and writes the page; ``prunescope report audit.json`` calls it. This package
imports neither torch nor the audit code, so a report can be re-rendered on a machine without
torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prunescope.atomic import replace_file
from prunescope.errors import PrunescopeError

AUDIT_VERSION = "prunescope.audit/1"


class ReportError(PrunescopeError):
    """An audit file that cannot be rendered (missing, not JSON, another version)."""


def render(audit: dict) -> str:
    """The HTML page of an audit dictionary; ReportError when its content is incomplete."""
    check_version(audit, "the audit")
    from prunescope.report.page import page

    try:
        return page(audit)
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise ReportError(
            f"the audit is incomplete or malformed ({type(exc).__name__}: {exc}); re-run "
            "`prunescope audit` to regenerate it"
        ) from None


def write_report(audit: dict, path: str | os.PathLike) -> None:
    """Render ``audit`` and write it to ``path`` atomically."""
    replace_file(path, render(audit).encode("utf-8"))


def load_audit(path: str | os.PathLike) -> dict:
    """An ``audit.json`` as a dictionary, or a one-line ReportError."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"no such audit file: {path}; give the audit.json written by "
                          "`prunescope audit`")
    try:
        audit = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ReportError(f"{path} is not JSON; give the audit.json written by "
                          "`prunescope audit`") from None
    check_version(audit, str(path))
    return audit


def rerender(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Re-render ``path`` (an audit.json) to ``out`` (default: report.html beside it)."""
    audit = load_audit(path)
    target = Path(out) if out is not None else Path(path).with_name("report.html")
    write_report(audit, target)
    return target


def check_version(audit: object, where: str) -> None:
    """ReportError unless ``audit`` is a mapping with ``version == AUDIT_VERSION``."""
    version = audit.get("version") if isinstance(audit, dict) else None
    if version != AUDIT_VERSION:
        raise ReportError(f"{where} has version {version!r}, but this prunescope renders "
                          f"{AUDIT_VERSION!r}; re-run `prunescope audit` to regenerate it")
