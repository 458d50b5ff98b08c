"""The compression audit: who pays for sparsity, per class, group and example.

>>> from prunescope.audit import run_audit
>>> run_audit(["runs/demo/dense"], ["runs/demo/magnitude+global/s0.9"], "runs/demo-audit")

writes ``audit.json`` and a self-contained ``report.html`` (see ``docs/audit.md``). The parts:

- :mod:`~prunescope.audit.predictions`: logits cached per run and split;
- :mod:`~prunescope.audit.metrics`: top-1/top-5, per-class recall/precision, calibration, flips;
- :mod:`~prunescope.audit.disaggregation`: Fairlearn MetricFrame by group, rate gaps, bias
  amplification, interdependence;
- :mod:`~prunescope.audit.exemplars`: compression-identified exemplars, Welch-tested classes;
- :mod:`~prunescope.audit.risk`: signals of the dense model that predict CIEs and flips;
- :mod:`~prunescope.audit.cost`: sparsity, parameters, FLOPs, sizes, latency;
- :mod:`~prunescope.audit.populations`: K-seed populations of a recipe;
- :mod:`~prunescope.audit.audit`: puts it together.
"""

from prunescope.audit.audit import VERSION, build, precheck, run_audit
from prunescope.audit.errors import AuditError

__all__ = ["VERSION", "AuditError", "build", "precheck", "run_audit"]
