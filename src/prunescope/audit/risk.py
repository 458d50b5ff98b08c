"""Risk before pruning: per-example signals of the dense models, and how well each predicts
which examples become compression-identified exemplars or flip.

Every signal is computed from the dense population alone (its logits ``[K, N, C]`` and the
labels), averaged over its K models, and oriented so that higher means more at risk:

- ``margin``: minus (top-1 probability - top-2 probability);
- ``entropy``: entropy of the softmax;
- ``loss``: cross-entropy of the label;
- ``el2n``: the L2 norm of (softmax - one-hot label), the error norm of Paul, Ganguli & Dziugaite,
  "Deep Learning on a Data Diet" (NeurIPS 2021), here on the trained dense models;
- ``dense_uncertain`` and ``dense_incorrect``: the criteria of Iofinova, Peste & Alistarh (CVPR
  2023) for samples at risk: the dense model's output is uncertain (``0.1 < p < 0.9``; the
  multi-class analogue is a max-probability below 0.9, which for two classes is the same test),
  or its prediction is wrong; the fraction of dense models for which it holds. The thresholds
  are the authors' (``bias_utils/runs.py``; their ``example_viewer.py`` splits outputs into
  correct/incorrect x high/low confidence the same way); the paper's own wording of the
  criteria was not available to us, so treat their exact form as our reading of the code;
- ``dense_disagreement``: the fraction of dense models whose prediction differs from the dense
  modal label (zero for a single model).

A dense model's row of non-finite logits gives no signal for that example: the signals average
over the models with finite logits there, and are NaN where no model has any; :func:`evaluate`
leaves such examples out (and says how many).

:func:`evaluate` scores a signal against a boolean target with scikit-learn's ROC AUC and curve,
and precision at k (k = number of positives unless given; tied scores share the top-k places
evenly, so a 0/1 signal gets the precision of a random order within its ties).
"""

from __future__ import annotations

import warnings

import numpy as np

from prunescope.audit.exemplars import modal_labels
from prunescope.audit.metrics import entropy, finite_rows, predicted, softmax

SIGNALS = ("margin", "entropy", "loss", "el2n", "dense_uncertain", "dense_incorrect",
           "dense_disagreement")
CONFIDENT = 0.9
ROC_POINTS = 101


def signals(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """``{name: risk [N]}`` for every name in :data:`SIGNALS`, from dense ``logits [K, N, C]``."""
    logits = np.asarray(logits)
    if logits.ndim == 2:
        logits = logits[None]
    k, n, c = logits.shape
    finite = finite_rows(logits)
    probs = softmax(np.where(finite[..., None], logits, 0.0))
    rows = np.arange(n)
    top2 = np.sort(probs, axis=-1)[..., -2:]
    onehot = np.eye(c)[labels]
    predictions = predicted(logits)
    modal = modal_labels(predictions, c)
    out = {
        "margin": -(top2[..., 1] - top2[..., 0]),
        "entropy": entropy(probs),
        "loss": -np.log(np.clip(probs[:, rows, labels], 1e-300, None)),
        "el2n": np.linalg.norm(probs - onehot[None], axis=-1),
        "dense_uncertain": (probs.max(axis=-1) < CONFIDENT).astype(np.float64),
        "dense_incorrect": (predictions != labels).astype(np.float64),
        "dense_disagreement": (predictions != modal).astype(np.float64),
    }
    with warnings.catch_warnings():  # an example no dense model scores: NaN, by design
        warnings.simplefilter("ignore", RuntimeWarning)
        return {name: np.nanmean(np.where(finite, value, np.nan), axis=0)
                for name, value in out.items()}


def precision_at_k(scores: np.ndarray, target: np.ndarray, k: int | None = None) -> float:
    """Expected fraction of positives among the ``k`` highest scores, ties broken uniformly at
    random (the examples tied at the cut share the remaining places evenly)."""
    scores, target = np.asarray(scores, dtype=np.float64), np.asarray(target, dtype=bool)
    k = int(target.sum()) if k is None else int(k)
    if k <= 0:
        return float("nan")
    k = min(k, len(scores))
    cut = np.sort(scores)[::-1][k - 1]
    above = scores > cut
    tied = scores == cut
    hits = target[above].sum() + (k - above.sum()) * target[tied].mean()
    return float(hits / k)


def evaluate(scores: np.ndarray, target: np.ndarray) -> dict:
    """``auroc``, ``precision_at_k`` (k = positives), ``positives``, ``base_rate`` and a ROC
    curve of at most :data:`ROC_POINTS` points, over the examples with a finite score
    (``unscored`` counts the others); AUROC and curve are None for a constant target."""
    from sklearn.metrics import roc_auc_score, roc_curve

    scores, target = np.asarray(scores, dtype=np.float64), np.asarray(target, dtype=bool)
    scored = np.isfinite(scores)
    scores, target = scores[scored], target[scored]
    out = {"positives": int(target.sum()), "base_rate": float(np.mean(target)) if len(target)
           else float("nan"), "precision_at_k": precision_at_k(scores, target),
           "auroc": None, "roc": None, "unscored": int((~scored).sum())}
    if 0 < target.sum() < len(target):
        out["auroc"] = float(roc_auc_score(target, scores))
        fpr, tpr, _ = roc_curve(target, scores)
        keep = np.unique(np.linspace(0, len(fpr) - 1, ROC_POINTS).round().astype(int))
        out["roc"] = {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()}
    return out


def evaluate_all(risk: dict[str, np.ndarray], target: np.ndarray) -> dict[str, dict]:
    """:func:`evaluate` for every signal."""
    return {name: evaluate(score, target) for name, score in risk.items()}
