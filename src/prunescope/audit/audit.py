"""The compression audit: dense and compressed runs in, ``audit.json`` and ``report.html`` out.

:func:`run_audit` loads (or computes and caches) every run's predictions, checks that they fit
together (one dataset, one label space, one split, the same examples in the same order), groups
the compressed runs into populations by (method, sparsity) -- K runs that differ only in their
seed form a population of K models -- and computes for the dense population and each compressed
one: the per-model metrics of :mod:`~prunescope.audit.metrics`, the disaggregation by class and
by group (:mod:`~prunescope.audit.disaggregation`), the compression-identified exemplars and
Welch-tested classes (:mod:`~prunescope.audit.exemplars`), the risk signals of the dense models
and how well they predict CIEs and flips (:mod:`~prunescope.audit.risk`), and the cost records
(:mod:`~prunescope.audit.cost`). The levels of one nested network (ELSA) are populations like
any other, one per level; :func:`nested_networks` lists them together, each beside the
populations trained separately at its sparsity. The JSON layout is described in
``docs/audit.md``; its ``version`` is :data:`VERSION`.

Focus populations (those with the most seeds, at most :data:`MAX_FOCUS`, ties to the most CIEs)
get bootstrap intervals, ROC curves, CIE images and reliability diagrams in the report; the
others get point estimates, so that an audit of a whole sweep stays fast.
"""

from __future__ import annotations

import base64
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from prunescope.audit import disaggregation, exemplars, metrics, noise, risk
from prunescope.audit import predictions as cache
from prunescope.audit.errors import AuditError
from prunescope.audit.predictions import CHECKPOINT, Predictions, load_or_compute, load_splits
from prunescope.audit.schema import VERSION, AuditResult

MAX_FOCUS = 4
CACHE = Path(".cache") / "predictions"  # under the audit's output directory
IMAGES = 24
LEVEL_TOLERANCE = 1e-9  # a population's sparsity matches a nested level this closely
Log = Callable[[str], None]
logger = logging.getLogger(__name__)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_audit(dense: Sequence[str | Path], compressed: Sequence[str | Path], out: str | Path, *,
              split: str = "test", n_boot: int = 100, alpha: float = exemplars.ALPHA,
              data_root: str | None = None, log: Log = _stderr,
              cache_dir: str | Path | None = None,
              threads: Sequence[str | Path] = ()) -> AuditResult:
    """Audit ``compressed`` runs against ``dense`` runs; write ``out/audit.json`` and
    ``out/report.html`` (nothing is written to ``out`` unless the inputs fit together).

    Predictions are cached in ``cache_dir`` (default ``out/.cache/predictions``), never in the
    input runs, which may be read-only; new cache files are written after the audit files.
    ``threads`` are dense runs that differ only in their thread count (the noise floor's
    tooling population; not part of the dense population). The noise floor reads every
    population's weights from its checkpoints (:func:`~prunescope.audit.noise.weight_vector`).
    Returns the typed :class:`~prunescope.audit.schema.AuditResult` (also in ``audit.json``)."""
    dense_dirs, compressed_dirs = _run_dirs(dense, "--dense"), _run_dirs(compressed, "--compressed")
    thread_dirs = _run_dirs(threads, "threads") if threads else []
    _distinct(dense_dirs + compressed_dirs + thread_dirs)
    seeds = precheck(dense_dirs + thread_dirs, compressed_dirs)
    cache_dir = Path(cache_dir) if cache_dir is not None else Path(out) / CACHE
    started = time.perf_counter()
    loaded, fresh = _load_all(dense_dirs + compressed_dirs + thread_dirs, seeds, split,
                              data_root, cache_dir, log)
    predicted = time.perf_counter()
    d, c = len(dense_dirs), len(dense_dirs) + len(compressed_dirs)
    result = build(loaded[:d], loaded[d:c], n_boot=n_boot, alpha=alpha,
                   threads=loaded[c:] or None, weights=noise.weight_vector)
    result.images = cie_images(result, loaded[0], data_root)
    result.seconds = {"predictions": predicted - started,
                      "analysis": time.perf_counter() - predicted}
    write(result, Path(out))
    for member in fresh:
        cache.save(member, cache_dir)
    log(f"audit: {len(loaded)} models, {result.seconds['analysis']:.1f} s beyond predictions "
        f"({result.seconds['predictions']:.1f} s loading/computing them)")
    for line in summary_lines(result):
        log(line)
    return result


def summary_lines(result: AuditResult) -> list[str]:
    """One line per focus population: CIEs and flips, and the dense accuracy on CIEs vs the
    rest; then its CIEs against the noise floor, and each population's churn."""
    lines = []
    for block in result.populations:
        if block.label not in result.focus:
            continue
        cie, head = block.cie, f"audit {block.label} ({block.k} seeds)"
        if not cie.count:
            lines.append(f"{head}: no CIEs; {block.flip_count:.1f} flips")
            continue
        lines.append(f"{head}: {cie.count} CIEs ({100 * cie.fraction:.2f}%), "
                     f"{block.flip_count:.1f} flips; dense accuracy on CIEs "
                     f"{_percent(cie.dense_accuracy_cie)} vs "
                     f"{_percent(cie.dense_accuracy_rest)} on the rest")
    return lines + noise_lines(result)


def _percent(value: float | None) -> str:
    """A fraction as a percentage; ``n/a`` where the set it is taken over is empty (every
    example a CIE, or none)."""
    return "n/a (no examples)" if value is None else f"{100 * value:.1f}%"


def noise_lines(result: AuditResult) -> list[str]:
    """The noise floor in words: each focus population's CIEs against the dense-vs-dense
    floor of its size, and the churn of the dense, focus and thread-count populations."""
    floor = result.noise_floor
    if floor is None:
        return []
    lines = []
    for row in floor.cie_comparison:
        if row.label not in result.focus:
            continue
        if row.floor_size is None:
            lines.append(f"noise floor {row.label}: {row.note}")
            continue
        verdict = "above" if row.above_range else "NOT above"
        lines.append(f"noise floor {row.label}: {row.count} CIEs vs {row.floor_mean:.1f} "
                     f"[{row.floor_min}, {row.floor_max}] between dense populations of "
                     f"{row.floor_size} ({verdict} the floor's range)")
    for block in floor.populations:
        if block.label in result.focus or block.label == "dense" or block.kind != "seeds":
            churn = (f"churn {100 * block.churn.mean:.2f}% [{100 * block.churn.min:.2f}, "
                     f"{100 * block.churn.max:.2f}] over {block.pairs} pairs"
                     if block.churn else block.note)
            spread = ("" if block.accuracy_std is None
                      else f"; accuracy std {100 * block.accuracy_std:.2f} points")
            lines.append(f"noise {block.label} ({block.k} models, {block.kind}): {churn}"
                         f"{spread}")
    return lines


def write(result: AuditResult, out: Path) -> None:
    """``out/audit.json`` and ``out/report.html``, each written atomically; the page is
    rendered first, so a rendering failure leaves neither file behind."""
    from prunescope.files import atomic_write_bytes
    from prunescope.report import render

    html = render(result)
    text = result.to_json()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "audit.json", text.encode("utf-8"))
    atomic_write_bytes(out / "report.html", html.encode("utf-8"))


def build(dense: list[Predictions], compressed: list[Predictions], *, n_boot: int = 100,
          alpha: float = exemplars.ALPHA, seed: int = 0,
          threads: list[Predictions] | None = None,
          weights: noise.WeightLoader | None = None) -> AuditResult:
    """The typed audit (without images and timings) from loaded predictions; ``threads`` is
    the thread-count population of the noise floor, ``weights(run)`` a run's flat weights
    (without it the noise floor has no weight distances)."""
    if not dense or not compressed:
        raise AuditError("an audit needs at least one dense and one compressed run; pass "
                         "--dense RUN... and --compressed RUN...")
    check_compatible(dense + compressed + (threads or []))
    _refuse_non_finite_dense(dense)
    first = dense[0]
    info = _dataset_info(first)
    groups = _populations(compressed)
    dense_block = population_block("dense", None, None, dense, info)
    blocks = [population_block(label, method, sparsity, members, info, dense=dense)
              for (label, method, sparsity), members in groups.items()]
    focus = choose_focus(blocks)
    floor = _noise_floor(dense, list(groups.values()), blocks, threads, weights, seed)
    risk_signals = risk.signals(np.stack([p.logits for p in dense]), first.labels)
    add_disaggregation(dense_block, first, info, n_boot=n_boot, seed=seed)
    for block in blocks:
        add_disaggregation(block, first, info, n_boot=n_boot if block["label"] in focus else 0,
                           seed=seed)
    for block in blocks:
        add_welch_and_risk(block, dense_block, risk_signals, alpha, keep_curves=block["label"]
                           in focus)
        if block["label"] not in focus:
            for key in ("positions", "dense_modal", "compressed_modal"):
                block["cie"].pop(key)
    columns = [{"name": m.name, "label": m.label, "percent": m.percent}
               for m in metrics.table(info["num_classes"])]
    return AuditResult.from_dict(metrics.clean({
        "version": VERSION, "dataset": info, "settings": {"n_boot": n_boot, "alpha": alpha,
                                                      "correction": exemplars.CORRECTION},
        "dense": dense_block, "populations": blocks, "focus": focus, "noise_floor": floor,
        "risk_signals": list(risk.SIGNALS), "metric_columns": columns,
        "nested": nested_networks(groups), "warnings": model_warnings([dense_block, *blocks]),
    }))


def _noise_floor(dense: list[Predictions], groups: list[list[Predictions]], blocks: list[dict],
                 threads: list[Predictions] | None, weights: noise.WeightLoader | None,
                 seed: int) -> dict:
    """:func:`prunescope.audit.noise.noise_floor` of the loaded populations."""
    stack = lambda members: np.stack([m.predicted for m in members])  # noqa: E731
    runs = lambda members: [m.meta.get("run") for m in members]  # noqa: E731
    populations = [{"label": block["label"], "predictions": stack(members),
                    "runs": runs(members), "cie_count": block["cie"]["count"]}
                   for members, block in zip(groups, blocks, strict=True)]
    return noise.noise_floor(stack(dense), populations, dense[0].labels,
                             dense[0].logits.shape[1], dense_runs=runs(dense),
                             threads=(stack(threads), runs(threads)) if threads else None,
                             weights=weights, seed=seed)


def model_warnings(blocks: list[dict]) -> list[str]:
    """One line per collapsed model, per model with non-finite logits and per population whose
    CIEs mix in seed noise (one model a side), each also logged as a warning."""
    lines = []
    for block in blocks:
        for model in block["models"]:
            where = f"{block['label']} model {model['run']}"
            if model["collapsed"]:
                lines.append(f"{where} collapsed: accuracy {model['accuracy']:.4f}, at or below "
                             f"chance + {metrics.CHANCE_MARGIN:g}; its figures describe a "
                             "broken model")
            if model["non_finite"]:
                lines.append(f"{where} gives non-finite logits (NaN/inf) on "
                             f"{model['non_finite']} examples, counted as wrong")
    lines.extend(_grouped_cie_warnings(blocks))
    for line in lines:
        logger.warning("audit: %s", line)
    return lines


def _grouped_cie_warnings(blocks: list[dict]) -> list[str]:
    """One line per distinct CIE warning, naming the populations it concerns (a sweep of
    single-seed runs would otherwise repeat the same warning for each of them)."""
    labels: dict[str, list[str]] = {}
    for block in blocks:
        if (warning := (block.get("cie") or {}).get("warning")):
            labels.setdefault(warning, []).append(block["label"])
    lines = []
    for warning, names in labels.items():
        if len(names) == 1:
            lines.append(f"{names[0]}: {warning}")
            continue
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        lines.append(f"{len(names)} populations ({shown}), each: {warning}")
    return lines


def _refuse_non_finite_dense(dense: list[Predictions]) -> None:
    """A dense model with no finite row of logits is no reference: a one-line AuditError."""
    for member in dense:
        if not metrics.finite_rows(member.logits).any():
            raise AuditError(f"dense run {member.meta.get('run', '?')} gives non-finite logits "
                             "on every example (NaN/inf: a diverged model); retrain it or leave "
                             "it out of --dense")


def check_compatible(loaded: list[Predictions]) -> None:
    """One dataset, one label space, one split, the same examples: else a one-line AuditError."""
    first = loaded[0]
    for other in loaded[1:]:
        a, b = first.meta.get("run", "?"), other.meta.get("run", "?")
        for key, what in (("dataset", "datasets"), ("classes", "label spaces"),
                          ("split", "splits")):
            if first.meta.get(key) != other.meta.get(key):
                raise AuditError(f"{a} and {b} come from different {what} ({first.meta.get(key)}"
                                 f" vs {other.meta.get(key)}); audit models of one dataset, "
                                 "label space and split together")
        if first.logits.shape[1] != other.logits.shape[1]:
            raise AuditError(f"{a} and {b} have different numbers of classes "
                             f"({first.logits.shape[1]} vs {other.logits.shape[1]})")
        if not (np.array_equal(first.index, other.index)
                and np.array_equal(first.labels, other.labels)):
            raise AuditError(f"{a} and {b} were evaluated on different examples (another split "
                             "or order); recompute their predictions on the same split")
        if (first.groups is None) != (other.groups is None) or (
                first.groups is not None and not np.array_equal(first.groups, other.groups)):
            raise AuditError(f"{a} and {b} carry different group labels; audit runs of one "
                             "dataset together")


def population_block(label: str, method: str | None, sparsity: float | None,
                     members: list[Predictions], info: dict, *,
                     dense: list[Predictions] | None = None) -> dict:
    """Per-model metrics and population summary of one population (dense when ``dense`` is
    None); ``_predictions [K, N]`` rides along for the group analysis and is removed there."""
    labels, num_classes = members[0].labels, info["num_classes"]
    predictions = np.stack([m.predicted for m in members])
    models = [_model_entry(m, labels, num_classes, dense) for m in members]
    recall = np.array([m["recall"] for m in models], dtype=np.float64)
    accuracy = np.array([m["accuracy"] for m in models])
    mean_recall = np.nanmean(recall, axis=0)
    worst, worst_recall = metrics.worst_class(mean_recall)
    block = {
        "label": label, "method": method, "sparsity": sparsity, "k": len(members),
        "models": models, "accuracy": _spread(accuracy, len(labels)),
        "recall": mean_recall.tolist(), "worst_class": worst, "worst_class_recall": worst_recall,
        "values": {m.name: m.aggregate([model["values"][m.name] for model in models])
                   for m in metrics.table(num_classes)},
        "reliability": _pooled_reliability(members, labels),
        "direct_sparsity": _mean_cost(models, "sparsity"),
        "effective_sparsity": _mean_cost(models, "effective_sparsity"),
        "collapsed": [m["run"] for m in models if m["collapsed"]],
        "_predictions": predictions,
    }
    if dense is not None:
        dense_predictions = np.stack([d.predicted for d in dense])
        block["cie"] = exemplars.summary(dense_predictions, predictions, labels, num_classes)
        block["flip_count"] = float(np.mean([m["flips"]["count"] for m in models]))
        block["flip_rate"] = float(np.mean([m["flips"]["rate"] for m in models]))
    block["representations"] = _representations(members, dense, block.get("cie"))
    return block


def _representations(members: list[Predictions], dense: list[Predictions] | None,
                     cie: dict | None) -> dict | None:
    """Q-score and prediction depth of the population (CIEs vs the rest for a compressed
    one): :func:`prunescope.audit.representations.summary`."""
    from prunescope.audit import representations

    return representations.summary(members, dense, None if cie is None else cie["positions"])


def add_disaggregation(block: dict, first: Predictions, info: dict, *, n_boot: int,
                       seed: int) -> None:
    """By class always; by group (with FPR/FNR for a binary task, and bias amplification for
    two groups) where the dataset has groups. Consumes ``block["_predictions"]``."""
    predictions, labels = block.pop("_predictions"), first.labels
    block["by_class"] = disaggregation.population_disaggregation(
        labels, predictions, labels, names=info["classes"], n_boot=n_boot, seed=seed)
    block["interdependence"] = {"value": None, "reason": "single-label model: each prediction "
                                "is one class, so the one-vs-rest predictions determine each "
                                "other (R^2 = 1); it applies to multi-label outputs"}
    if first.groups is None:
        return
    block["by_group"] = disaggregation.population_disaggregation(
        labels, predictions, first.groups, names=info["group_names"],
        binary=info["num_classes"] == 2, n_boot=n_boot, seed=seed)
    prevalence = first.meta.get("train_prevalence")
    if len(info["group_names"]) == 2 and prevalence:
        block["bias_amplification"] = _bias_amplification(predictions, first, prevalence, info)


def add_welch_and_risk(block: dict, dense_block: dict, risk_signals: dict, alpha: float, *,
                       keep_curves: bool) -> None:
    """Welch-tested classes, normalised recall change, and risk-signal scores for CIEs/flips."""
    dense_recall = np.array([m["recall"] for m in dense_block["models"]], dtype=np.float64)
    dense_acc = np.array([m["accuracy"] for m in dense_block["models"]])
    recall = np.array([m["recall"] for m in block["models"]], dtype=np.float64)
    acc = np.array([m["accuracy"] for m in block["models"]])
    block["normalised_change"] = metrics.normalised_change(dense_recall, dense_acc, recall, acc)
    block["welch"] = exemplars.welch_classes(dense_recall, dense_acc, recall, acc, alpha)
    block["welch_summary"] = exemplars.welch_summary(block["welch"], alpha)
    cie = np.zeros(len(risk_signals["margin"]), dtype=bool)
    cie[block["cie"]["positions"]] = True
    flipped = np.zeros_like(cie)
    for model in block["models"]:
        flipped[model.pop("_flipped")] = True
    block["risk"] = {"cie": risk.evaluate_all(risk_signals, cie),
                     "flip": risk.evaluate_all(risk_signals, flipped)}
    if not keep_curves:
        for target in block["risk"].values():
            for entry in target.values():
                entry["roc"] = None


def choose_focus(blocks: list[dict]) -> list[str]:
    """Labels of the populations with the most seeds, at most MAX_FOCUS, most CIEs first."""
    most = max(b["k"] for b in blocks)
    candidates = [b for b in blocks if b["k"] == most]
    candidates.sort(key=lambda b: -b["cie"]["count"])
    chosen = {b["label"] for b in candidates[:MAX_FOCUS]}
    return [b["label"] for b in blocks if b["label"] in chosen]


def cie_images(result: AuditResult, first: Predictions, data_root: str | None,
               limit: int = IMAGES) -> dict:
    """Up to ``limit`` CIEs per focus population (those the dense population gets right
    first), as images or texts (:func:`_examples`); empty if the data is missing."""
    from prunescope.errors import PrunescopeError

    try:
        splits = load_splits(first.meta.get("data") or {}, data_root, None, Path("?"))
    except PrunescopeError:
        return {}
    subset = getattr(splits, first.meta["split"])
    out = {}
    for block in result.populations:
        if block.label not in result.focus or not block.cie.positions:
            continue
        order = _image_order(block.cie, first.labels)[:limit]
        positions = [block.cie.positions[i] for i in order]
        out[block.label] = {
            **_examples(splits, subset, positions),
            "labels": [int(first.labels[p]) for p in positions],
            "dense_modal": [block.cie.dense_modal[i] for i in order],
            "compressed_modal": [block.cie.compressed_modal[i] for i in order],
            "index": [int(first.index[p]) for p in positions],
        }
    return out


def _examples(splits, subset, positions: list[int]) -> dict:
    """The examples at ``positions`` as the report shows them: the texts of a text dataset,
    else base64 uint8 pixels ``[n, C, H, W]`` in [0, 255]."""
    if splits.is_text:
        return {"texts": [splits.texts[int(subset.index[p])] for p in positions]}
    pixels = splits.unnormalise(subset.x[positions]).clamp(0, 1).mul(255).round()
    array = pixels.numpy().astype(np.uint8)
    return {"shape": list(array.shape), "pixels": base64.b64encode(array.tobytes()).decode()}


def _image_order(cie, labels: np.ndarray) -> list[int]:
    right = [i for i, p in enumerate(cie.positions) if cie.dense_modal[i] == labels[p]]
    wrong = [i for i, p in enumerate(cie.positions) if cie.dense_modal[i] != labels[p]]
    return right + wrong


def _model_entry(member: Predictions, labels: np.ndarray, num_classes: int,
                 dense: list[Predictions] | None) -> dict:
    entry = {"run": member.meta.get("run"), "seed": member.meta.get("seed"),
             **metrics.model_metrics(member.logits, labels, num_classes),
             "cost": member.meta.get("cost")}
    entry["collapsed"] = metrics.collapsed(entry["accuracy"], num_classes)
    if dense is not None:
        parent = next((d for d in dense if d.meta.get("seed") == member.meta.get("seed")),
                      dense[0])
        flipped = metrics.flips(parent.predicted, member.predicted)
        entry["_flipped"] = np.flatnonzero(flipped)
        entry["flips"] = {"count": int(flipped.sum()), "rate": float(flipped.mean()),
                          "paired_dense": parent.meta.get("run")}
    return entry


def _spread(accuracy: np.ndarray, n: int) -> dict:
    """Mean, std, min, max over the models, and an interval: the range over seeds for K >= 2,
    the Wilson 95% interval of the single model's accuracy (scipy) for K = 1."""
    out = {"mean": float(accuracy.mean()), "std": float(accuracy.std()),
           "min": float(accuracy.min()), "max": float(accuracy.max())}
    if len(accuracy) >= 2:
        out["interval"], out["interval_kind"] = [out["min"], out["max"]], "range over seeds"
    else:
        from scipy.stats import binomtest

        ci = binomtest(int(round(accuracy[0] * n)), n).proportion_ci(method="wilson")
        out["interval"], out["interval_kind"] = [ci.low, ci.high], "Wilson 95%"
    return out


def _pooled_reliability(members: list[Predictions], labels: np.ndarray) -> dict | None:
    """The reliability curve of every model's finite rows pooled (None without any)."""
    finite = [metrics.finite_rows(m.logits) for m in members]
    probs = [metrics.softmax(m.logits[f]) for m, f in zip(members, finite, strict=True)]
    if not sum(len(p) for p in probs):
        return None
    confidence = np.concatenate([p.max(axis=1) for p in probs])
    correct = np.concatenate([p.argmax(axis=1) == labels[f]
                              for p, f in zip(probs, finite, strict=True)])
    return metrics.reliability_curve(confidence, correct)



def _mean_cost(models: list[dict], key: str) -> float | None:
    """The mean of a cost figure over the models; None where a model lacks it (effective
    sparsity of a transformer, :func:`prunescope.connectivity.analysable`)."""
    values = [m["cost"][key] for m in models if m.get("cost")]
    return float(np.mean(values)) if values and None not in values else None


def _bias_amplification(predictions: np.ndarray, first: Predictions, prevalence: list,
                        info: dict) -> dict:
    """Per class (one-vs-rest attribute; the positive class for a binary task) w.r.t. the two
    groups, averaged over the population's models; skipped attributes carry the reason."""
    classes = [1] if info["num_classes"] == 2 else range(info["num_classes"])
    out = {}
    for c in classes:
        values, reason = [], ""
        for row in predictions:
            value, reason = disaggregation.bias_amplification(
                first.labels == c, row == c, first.groups,
                (prevalence[0][c], prevalence[1][c]))
            values.append(value)
        defined = [v for v in values if v is not None]
        out[info["classes"][c]] = ({"value": float(np.mean(defined)), "per_model": values}
                                   if defined else {"value": None, "reason": reason})
    return out


def _dataset_info(first: Predictions) -> dict:
    classes = first.meta.get("classes") or [str(c) for c in range(first.logits.shape[1])]
    return {"name": first.meta.get("dataset"), "split": first.meta.get("split"),
            "num_examples": len(first.labels), "num_classes": len(classes), "classes": classes,
            "group_names": first.meta.get("group_names") or [],
            "binary": len(classes) == 2}


def _populations(compressed: list[Predictions]) -> dict[tuple, list[Predictions]]:
    """Compressed predictions grouped by (label, method, sparsity), sorted by method then
    sparsity."""
    groups: dict[tuple, list[Predictions]] = {}
    for member in compressed:
        method = member.meta.get("method") or {}
        name = method.get("label") or "compressed"
        sparsity = method.get("sparsity")
        if sparsity is None:
            sparsity = round((member.meta.get("cost") or {}).get("sparsity", 0.0), 4)
        key = (f"{name} s={sparsity:g}", name, float(sparsity))
        groups.setdefault(key, []).append(member)
    order = {name: i for i, name in enumerate(dict.fromkeys(k[1] for k in groups))}
    return dict(sorted(groups.items(), key=lambda kv: (order[kv[0][1]], kv[0][2])))


def nested_networks(groups: dict[tuple, list[Predictions]]) -> list[dict] | None:
    """The populations that are levels of one nested network (ELSA: checkpoint metadata
    ``method.levels``), one entry per method label, each level beside the populations of the
    other methods at its sparsity (``dense`` for the dense level); None when there are none.
    A population's levels are its first member's."""
    held: dict[tuple, dict[float, str]] = {}
    for (label, name, sparsity), members in groups.items():
        levels = (members[0].meta.get("method") or {}).get("levels")
        if levels:
            held.setdefault((name, tuple(levels)), {})[sparsity] = label
    if not held:
        return None
    nested = {label for levels in held.values() for label in levels.values()}
    others = [(label, sparsity) for (label, _, sparsity) in groups if label not in nested]
    close = lambda a, b: abs(a - b) <= LEVEL_TOLERANCE  # noqa: E731
    return [{"method": name, "levels": [
        {"sparsity": level,
         "population": next((lb for s, lb in labels.items() if close(s, level)), None),
         "separate": ["dense"] * (level == 0) + [lb for lb, s in others if close(s, level)]}
        for level in levels]} for (name, levels), labels in held.items()]


def _run_dirs(paths: Sequence[str | Path], flag: str) -> list[Path]:
    if not paths:
        raise AuditError(f"{flag} needs at least one run directory (a folder holding "
                         f"{CHECKPOINT}); an empty population cannot be audited")
    dirs = [Path(p) for p in paths]
    for d in dirs:
        if not (d / CHECKPOINT).is_file():
            raise AuditError(f"{d} holds no {CHECKPOINT}; pass run directories of finished "
                             "prunescope runs (e.g. runs/demo/dense)")
    return dirs


def _distinct(dirs: list[Path]) -> None:
    """Refuse a run given twice (it would pose as two members of a population)."""
    seen: set[Path] = set()
    for d in dirs:
        resolved = d.resolve()
        if resolved in seen:
            raise AuditError(f"{d} is given twice; every population member must be a different "
                             "run (different seeds)")
        seen.add(resolved)


def precheck(dense: list[Path], compressed: list[Path]) -> dict[Path, int]:
    """Before any prediction is computed, refuse runs of different datasets or label spaces,
    and compressed (or dense) runs of another architecture than the first dense run (the model
    spec in the checkpoints' metadata; a run without one is a warning); returns each run's
    data seed."""
    from prunescope import checkpoint

    metas = {d: checkpoint.load(d / CHECKPOINT).meta for d in [*dense, *compressed]}
    first, seeds = None, {}
    for d, meta in metas.items():
        data = meta.get("data") or {}
        key = (data.get("name"), (meta.get("model") or {}).get("num_classes"))
        first = first or (d, key)
        if key[0] != first[1][0] or None not in (key[1], first[1][1]) and key[1] != first[1][1]:
            raise AuditError(f"{first[0]} and {d} were trained on different datasets or label "
                             f"spaces ({first[1][0]}, {first[1][1]} classes vs {key[0]}, "
                             f"{key[1]} classes); audit models of one dataset together")
        seeds[d] = int(data.get("seed") or 0)
    _same_architecture(dense[0], metas)
    return seeds


def _same_architecture(reference: Path, metas: dict[Path, dict]) -> None:
    spec = metas[reference].get("model")
    for d, meta in metas.items():
        other = meta.get("model")
        if not spec or not other:
            logger.warning("audit: %s has no model spec in its checkpoint; cannot check that "
                           "it is the same architecture as %s", d if not other else reference,
                           reference if not other else d)
            continue
        if other != spec:
            raise AuditError(f"{d} is a {_describe(other)} but the dense run {reference} is a "
                             f"{_describe(spec)}; compressed runs must be compressions of the "
                             "dense architecture: audit each against dense runs of its own")


def _describe(spec: dict) -> str:
    from prunescope.checkpoint import describe

    return describe(spec)


def _load_all(dirs: list[Path], seeds: dict[Path, int], split: str, data_root: str | None,
              cache_dir: Path, log: Log) -> tuple[list[Predictions], list[Predictions]]:
    """Every run's predictions, in order, and those computed afresh (not cached yet)."""
    splits_cache: dict = {}
    loaded: dict[Path, Predictions] = {}
    fresh = []
    for d in sorted(dirs, key=lambda d: seeds[d]):  # one dataset load per seed
        loaded[d], computed = load_or_compute(d, split, cache_dir=cache_dir,
                                              data_root=data_root, splits_cache=splits_cache)
        if computed:
            fresh.append(loaded[d])
    if fresh:
        log(f"audit: computed the predictions of {len(fresh)} of {len(dirs)} runs (cached in "
            f"{cache_dir})")
    return [loaded[d] for d in dirs], fresh
