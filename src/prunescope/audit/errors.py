"""The audit's user error."""

from __future__ import annotations

from prunescope.errors import PrunescopeError


class AuditError(PrunescopeError):
    """Audit inputs that do not fit together (datasets, splits, label spaces, group arrays,
    empty populations) or an audit file of another version; the message is one line."""
