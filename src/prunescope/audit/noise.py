"""The noise floor under the audit: how much models that differ only in noise disagree.

Zhuang, Zhang, Song & Hooker, "Randomness in Neural Network Training: Characterizing the Impact
of Tooling" (MLSys 2022; code usyd-fsalab/NeuralNetworkRandomness) measure, over runs of one
noise setting: the standard deviation of accuracy (overall and per subgroup), pairwise
prediction *churn* and pairwise L2 distance of the weights. Their ``get_churn`` returns the
*agreement* of two runs; churn here is one minus it: the fraction of examples on which two
models predict different labels (:func:`churn`).

Two settings are used here: populations that differ only in seed (the audit's populations) and,
as the CPU's stand-in for implementation noise, dense runs that differ only in
``torch.set_num_threads`` (``audit.threads``). The *CIE floor* (:func:`cie_floor`) asks how many
compression-identified exemplars (Hooker et al. 2019; :mod:`~prunescope.audit.exemplars`) two
*dense* populations of ``m`` models each produce against each other: every balanced split of
the dense models into two disjoint sets of ``m`` (a seeded sample of :data:`MAX_SPLITS` when
there are more), with the same modal-label rule as the CIEs. A compressed population's CIE
count means something only where it clears that floor.

Everything here is numpy on predictions, except :func:`weight_vector`, which reads a
checkpoint (torch, on the CPU). A population of one model has no pairs: its churn and weight
distance are None with the reason in ``note``, never an error.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from prunescope.audit import exemplars, metrics

MAX_SPLITS = 500  # balanced dense splits per floor size; more are sampled (seeded)
ONE_MODEL = "one model: no pairs to compare (no churn, no spread, no weight distance)"
NO_WEIGHTS = "weights not given (predictions only): no weight distance"
WeightLoader = Callable[[str], np.ndarray]


def churn(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of examples on which predictions ``a`` and ``b`` (``[N]`` labels) differ; one
    minus the agreement that the MLSys'22 authors' ``get_churn`` returns. Two
    :data:`~prunescope.audit.metrics.NO_PREDICTION` entries agree."""
    return float(np.mean(np.asarray(a) != np.asarray(b)))


def pairwise_churn(predictions: np.ndarray) -> np.ndarray:
    """Churn of every pair ``i < j`` of the rows of ``predictions [K, N]``, in
    ``itertools.combinations`` order (empty for one model)."""
    predictions = np.atleast_2d(predictions)
    return np.array([churn(predictions[i], predictions[j])
                     for i, j in itertools.combinations(range(len(predictions)), 2)])


def pairwise_l2(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """L2 distance ``||w_i - w_j||_2`` of every pair ``i < j`` of flat weight vectors
    (accumulated in float64), in ``itertools.combinations`` order."""
    return np.array([float(np.linalg.norm(np.asarray(vectors[i], dtype=np.float64)
                                          - np.asarray(vectors[j], dtype=np.float64)))
                     for i, j in itertools.combinations(range(len(vectors)), 2)])


def weight_vector(run: str | Path) -> np.ndarray:
    """The model's parameters of the run's ``model.safetensors`` (loaded on the CPU by
    :func:`prunescope.checkpoint.load`), flattened into one float32 vector in the rebuilt
    model's ``named_parameters`` order; when the checkpoint cannot be rebuilt (no model spec),
    every floating-point tensor except batch-norm running statistics, by name."""
    import torch

    from prunescope import checkpoint
    from prunescope.audit.predictions import CHECKPOINT
    from prunescope.errors import PrunescopeError

    path = Path(run) / CHECKPOINT
    state = checkpoint.load(path)
    try:
        with torch.random.fork_rng(devices=[]):  # building initialises: keep the global RNG
            model = checkpoint.build_model(state, path)
        names = [name for name, _ in model.named_parameters()]
    except PrunescopeError:
        names = sorted(k for k, v in state.model.items() if v.is_floating_point()
                       and not k.endswith(("running_mean", "running_var")))
    return torch.cat([state.model[k].detach().reshape(-1).to(torch.float32)
                      for k in names]).numpy()


def spread(values: np.ndarray) -> dict | None:
    """Mean, std, min and max of ``values`` (None when there are none)."""
    values = np.asarray(values, dtype=np.float64)
    if not values.size:
        return None
    return {"mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max())}


def population_noise(label: str, kind: str, predictions: np.ndarray, labels: np.ndarray,
                     num_classes: int, runs: Sequence[str | None], *,
                     weights: WeightLoader | None = None) -> dict:
    """The noise of one population (``predictions [K, N]``): pairwise churn, the std over its
    models of overall accuracy and of each class's accuracy (recall; NaN for a class absent
    from the labels; both None for one model), and the pairwise L2 distance of the weights
    read by ``weights(run)`` (population std: ``numpy.std``, ddof 0, as for ``accuracy.std``).
    ``kind`` names what the models differ in (``"seeds"``, ``"threads"``)."""
    predictions = np.atleast_2d(predictions)
    accuracy = (predictions == labels).mean(axis=1)
    recall = np.stack([metrics.per_class_recall(metrics.confusion(labels, row, num_classes),
                                                np.bincount(labels, minlength=num_classes))
                       for row in predictions])
    notes, distance = [], None
    if len(predictions) < 2:
        notes.append(ONE_MODEL)
    elif weights is None or any(run is None for run in runs):
        notes.append(NO_WEIGHTS)
    else:
        distance = spread(pairwise_l2([weights(str(run)) for run in runs]))
    pairs, several = pairwise_churn(predictions), len(predictions) > 1
    return {"label": label, "kind": kind, "k": len(predictions), "runs": list(runs),
            "pairs": len(pairs), "churn": spread(pairs),
            "accuracy_std": float(accuracy.std()) if several else None,
            "per_class_accuracy_std": np.std(recall, axis=0).tolist() if several else None,
            "weight_distance": distance, "note": "; ".join(notes) or None}


def balanced_splits(k: int, size: int, *, limit: int = MAX_SPLITS,
                    seed: int = 0) -> tuple[list[tuple[tuple[int, ...], tuple[int, ...]]], bool]:
    """``(splits, exhaustive)``: unordered pairs of disjoint index sets of ``size`` drawn from
    ``range(k)``, each pair once (the side holding index ``min(A | B)`` first). All of them
    when there are at most ``limit``, else ``limit`` distinct ones drawn with ``seed``."""
    if size < 1 or 2 * size > k:
        raise ValueError(f"cannot split {k} models into two disjoint sets of {size}")
    total = math.comb(k, size) * math.comb(k - size, size) // 2
    if total <= limit:
        return [(a, b) for a in itertools.combinations(range(k), size)
                for b in itertools.combinations([i for i in range(k) if i not in a], size)
                if a[0] < b[0]], True
    rng, chosen = np.random.default_rng(seed), set()
    while len(chosen) < limit:
        picked = rng.permutation(k)[:2 * size]
        a, b = tuple(sorted(picked[:size].tolist())), tuple(sorted(picked[size:].tolist()))
        chosen.add((a, b) if a[0] < b[0] else (b, a))
    return sorted(chosen), False


def cie_floor(dense: np.ndarray, labels: np.ndarray, num_classes: int, size: int, *,
              limit: int = MAX_SPLITS, seed: int = 0) -> dict:
    """CIEs between two disjoint dense populations of ``size`` models each (rows of
    ``dense [K, N]``), over :func:`balanced_splits`: mean, min and max count, and the mean
    count per true class."""
    splits, exhaustive = balanced_splits(len(dense), size, limit=limit, seed=seed)
    counts = np.array([np.bincount(labels[exemplars.compression_identified(
        dense[list(a)], dense[list(b)], num_classes)], minlength=num_classes)
        for a, b in splits])
    totals = counts.sum(axis=1)
    return {"size": size, "splits": len(splits), "exhaustive": exhaustive,
            "mean": float(totals.mean()), "min": int(totals.min()), "max": int(totals.max()),
            "per_class": counts.mean(axis=0).tolist()}


def floor_size(k_dense: int, k_compressed: int) -> int:
    """The population size of the CIE floor for a compressed population of ``k_compressed``:
    that size when the dense models allow two disjoint sets of it, else the largest that does
    (0: fewer than two dense models, no floor)."""
    return min(k_compressed, k_dense // 2)


def compare(label: str, k: int, count: int, floor: dict | None, k_dense: int) -> dict:
    """A compressed population's CIE count against the floor of its size: the excess over the
    floor's mean, and whether the count lies above every dense-vs-dense split
    (``above_range``)."""
    if floor is None:
        return {"label": label, "k": k, "count": count, "floor_size": None, "floor_mean": None,
                "floor_min": None, "floor_max": None, "excess": None, "above_range": None,
                "note": f"{k_dense} dense model(s): two disjoint dense sets need 2 or more, "
                        "so there is no CIE floor"}
    note = None
    if floor["size"] < k:
        note = (f"{k_dense} dense models allow sets of {floor['size']}, not {k}: the floor "
                "is that of smaller populations (their modal labels are noisier, so it errs "
                "high)")
    return {"label": label, "k": k, "count": count, "floor_size": floor["size"],
            "floor_mean": floor["mean"], "floor_min": floor["min"], "floor_max": floor["max"],
            "excess": count - floor["mean"], "above_range": count > floor["max"], "note": note}


def noise_floor(dense: np.ndarray, populations: Sequence[dict], labels: np.ndarray,
                num_classes: int, *, dense_runs: Sequence[str | None],
                threads: tuple[np.ndarray, Sequence[str | None]] | None = None,
                weights: WeightLoader | None = None, seed: int = 0) -> dict:
    """The audit's ``noise_floor``: :func:`population_noise` of the dense population, of each
    compressed population (``{"label", "predictions", "runs", "cie_count"}``) and of the
    thread-count population (``threads``: its predictions and runs), then one
    :func:`cie_floor` per size the compressed populations need and each population's
    :func:`compare`."""
    dense = np.atleast_2d(dense)
    blocks = [population_noise("dense", "seeds", dense, labels, num_classes, dense_runs,
                               weights=weights)]
    blocks += [population_noise(p["label"], "seeds", p["predictions"], labels, num_classes,
                                p["runs"], weights=weights) for p in populations]
    if threads is not None:
        blocks.append(population_noise("dense, threads", "threads", threads[0], labels,
                                       num_classes, threads[1], weights=weights))
    sizes = sorted({floor_size(len(dense), len(np.atleast_2d(p["predictions"])))
                    for p in populations} - {0})
    floors = {m: cie_floor(dense, labels, num_classes, m, seed=seed) for m in sizes}
    comparison = []
    for p in populations:
        k = len(np.atleast_2d(p["predictions"]))
        comparison.append(compare(p["label"], k, p["cie_count"],
                                  floors.get(floor_size(len(dense), k)), len(dense)))
    return {"populations": blocks, "cie_floors": list(floors.values()),
            "cie_comparison": comparison}
