"""Shared inputs of the audit, report and browser tests (imported by them), and their checks.

- :func:`tiny_experiment`: a real run of a tiny recipe with an ``audit`` section on ``digits``
  (2 dense seeds, magnitude pruning at 0.5 and 0.9, a 2-seed population at 0.9), built once per
  test process in a temporary directory;
- :func:`synthetic_audit`: an audit built from hand-made predictions of a binary task with two
  groups (no torch, no training), which exercises the group sections.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import numpy as np

from prunescope.audit import build
from prunescope.audit.predictions import Predictions
from prunescope.audit.schema import AuditResult

TINY_AUDIT_RECIPE = {
    "name": "tiny-audit",
    "seed": 0,
    "data": {"name": "digits", "val_size": 100},
    "model": {"name": "lenet300"},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.1},
    "prune": {"methods": [{"criterion": "magnitude", "allocation": "global"}],
              "sparsities": [0.5, 0.9], "batches": 2, "batch_size": 64},
    "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
    "audit": {"seeds": 2, "methods": [{"criterion": "magnitude", "allocation": "global"}],
              "sparsities": [0.9], "bootstrap": 10},
}
_BUILT: dict[str, Path] = {}


def tiny_experiment() -> Path:
    """The run directory of :data:`TINY_AUDIT_RECIPE` (trained on first use, then reused)."""
    if "out" not in _BUILT:
        from prunescope import experiment, recipe

        root = Path(tempfile.mkdtemp(prefix="prunescope-audit-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        experiment.run(recipe.from_dict(TINY_AUDIT_RECIPE), root / "run", progress=False)
        _BUILT["out"] = root / "run"
    return _BUILT["out"]


def synthetic_predictions(*, seed: int, accuracy: float, n: int = 400, split: str = "test",
                          groups: bool = True, run: str = "") -> Predictions:
    """A binary task whose class 1 is common in group 1 during training; the model is right with
    probability ``accuracy`` (seeded), with confident logits where right."""
    rng = np.random.default_rng(100)  # the same labels and groups for every model
    labels = rng.integers(0, 2, n)
    group = np.where(rng.random(n) < 0.7, labels, 1 - labels)
    model_rng = np.random.default_rng(seed)
    right = model_rng.random(n) < accuracy
    predicted = np.where(right, labels, 1 - labels)
    margin = model_rng.uniform(0.2, 4.0, n)
    logits = np.zeros((n, 2), dtype=np.float32)
    logits[np.arange(n), predicted] = margin
    meta = {"run": run or f"model-{seed}", "split": split, "dataset": "synthetic",
            "classes": ["no", "yes"], "group_names": ["blue", "orange"] if groups else [],
            "seed": seed % 10, "train_prevalence": [[0.8, 0.2], [0.3, 0.7]] if groups else None}
    return Predictions(logits, labels, np.arange(n), group if groups else None, meta)


def synthetic_audit(n_boot: int = 10) -> AuditResult:
    """An audit of 3 dense and 3 + 1 compressed synthetic models (binary task, two groups)."""
    dense = [synthetic_predictions(seed=s, accuracy=0.95, run=f"dense-{s}") for s in range(3)]
    compressed = []
    for s in range(3):
        member = synthetic_predictions(seed=10 + s, accuracy=0.85, run=f"sparse-{s}")
        member.meta.update(method={"label": "magnitude+global", "sparsity": 0.9}, seed=s)
        compressed.append(member)
    single = synthetic_predictions(seed=20, accuracy=0.9, run="sparse-0.5")
    single.meta.update(method={"label": "magnitude+global", "sparsity": 0.5}, seed=0)
    return build(dense, [*compressed, single], n_boot=n_boot)


def test_synthetic_audit_has_the_group_sections():
    audit = synthetic_audit(n_boot=0).to_dict()
    assert audit["focus"] == ["magnitude+global s=0.9"]
    focus = audit["populations"][1]
    assert set(focus["by_group"]) == {"accuracy", "false_positive_rate", "false_negative_rate"}
    assert set(focus["bias_amplification"]) == {"yes"}
    assert focus["bias_amplification"]["yes"]["value"] is not None
