"""The audit report: ``audit.json`` -> one self-contained HTML page (no torch, no network).

:func:`render` turns a typed audit result (:class:`prunescope.audit.schema.AuditResult`, what
:func:`prunescope.audit.run_audit` returns) into HTML whose
figures are PNG data URIs drawn with matplotlib's Agg backend; the page loads no script, style
sheet, font or image from anywhere. :func:`rerender` reads an ``audit.json`` (one line for a
file of an older or newer version) and writes the page; ``prunescope report audit.json`` calls
it. This package imports no torch and of the audit only its torch-free schema, so a report can
be re-rendered on a machine without torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from prunescope.atomic import replace_file
from prunescope.audit.schema import VERSION as AUDIT_VERSION
from prunescope.audit.schema import AuditFileError, AuditResult

__all__ = ["AUDIT_VERSION", "ReportError", "load_audit", "render", "rerender", "write_report"]
ReportError = AuditFileError  # an audit file that cannot be rendered; one line


def render(audit: AuditResult) -> str:
    """The HTML page of a typed audit result."""
    from prunescope.report.page import page

    return page(audit)


def write_report(audit: AuditResult, path: str | os.PathLike) -> None:
    """Render ``audit`` and write it to ``path`` atomically."""
    replace_file(path, render(audit).encode("utf-8"))


def load_audit(path: str | os.PathLike) -> AuditResult:
    """An ``audit.json`` as the typed result, or a one-line ReportError (missing, not JSON,
    older or newer version, incomplete)."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"no such audit file: {path}; give the audit.json written by "
                          "`prunescope audit`")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ReportError(f"{path} is not JSON; give the audit.json written by "
                          "`prunescope audit`") from None
    return AuditResult.from_json(text, str(path))


def rerender(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Re-render ``path`` (an audit.json) to ``out`` (default: report.html beside it)."""
    audit = load_audit(path)
    target = Path(out) if out is not None else Path(path).with_name("report.html")
    write_report(audit, target)
    return target
