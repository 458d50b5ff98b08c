"""The compression audit: who pays for sparsity, per class, group and example.

>>> from prunescope.audit import run_audit
>>> result = run_audit(["runs/demo/dense"], ["runs/demo/magnitude+global/s0.9"], "runs/audit")

returns the typed :class:`~prunescope.audit.schema.AuditResult` and writes ``audit.json`` and a
self-contained ``report.html`` (see ``docs/audit.md``). The parts:

- :mod:`~prunescope.audit.schema`: the typed result and its JSON form (standard library only);
- :mod:`~prunescope.audit.predictions`: logits cached per checkpoint and split;
- :mod:`~prunescope.audit.metrics`: top-1/top-5, per-class recall/precision, calibration, flips,
  and the table of per-model metrics (:data:`~prunescope.audit.metrics.MODEL_METRICS`);
- :mod:`~prunescope.audit.disaggregation`: Fairlearn MetricFrame by group, rate gaps, bias
  amplification, interdependence;
- :mod:`~prunescope.audit.exemplars`: compression-identified exemplars, Welch-tested classes;
- :mod:`~prunescope.audit.risk`: signals of the dense model that predict CIEs and flips;
- :mod:`~prunescope.audit.noise`: the noise floor (churn, accuracy std, weight distance, and
  the CIEs two dense populations produce against each other);
- :mod:`~prunescope.audit.cost`: sparsity, parameters, FLOPs, sizes, latency;
- :mod:`~prunescope.audit.audit`: puts it together.

The names below are imported on first use, so that ``prunescope.audit.schema`` (which the
report reads) loads neither numpy nor torch.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {"run_audit": "audit", "build": "audit", "precheck": "audit",
            "summary_lines": "audit", "VERSION": "schema", "AuditResult": "schema",
            "AuditError": "errors"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
