"""The report page: headline numbers first, then the figures with one-line captions, then tables.

Everything is inline (CSS in a ``<style>`` element, figures as data URIs); there is no script.
:func:`page` takes the typed :class:`~prunescope.audit.schema.AuditResult` and reads it by
attribute; only the parts the schema keeps as plain JSON (a model's ``cost`` record, the CIE
``images``) are read by key.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from prunescope.audit.schema import (
    AuditResult,
    CIEVersusFloor,
    NestedNetwork,
    PopulationAudit,
    PopulationNoise,
    WelchSummary,
)
from prunescope.report import figures
from prunescope.report.remedies import OverSeeds, remedies

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1320px; padding: 0 24px 48px; color: #1c1c1c; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px;
margin-top: 2em; } .sub { color: #555; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 14px; margin: 16px 0; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: 12px 16px; min-width: 260px;
        flex: 1; background: #fafafa; }
.card h3 { margin: 0 0 6px; font-size: 1em; } .big { font-size: 1.6em; font-weight: 600; }
.bad { color: #b3261e; } .good { color: #1b6e20; } .muted { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 10px 0 6px; font-size: 0.88em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; } td.l, th.l { text-align: left; }
figure { margin: 18px 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #333; font-size: 0.92em; margin-top: 4px; }
.banner { background: #fde7e7; border: 2px solid #b3261e; color: #7a1010; padding: 8px 12px;
          margin: 12px 0; font-weight: 600; }
.finding { font-size: 1.05em; background: #fff7e0; border-left: 4px solid #e0a800;
           padding: 8px 12px; margin: 10px 0; }
"""


def page(result: AuditResult) -> str:
    """The whole HTML document."""
    title = f"Compression audit: {result.dataset.name}"
    body = [f"<h1>{_e(title)}</h1>", f"<p class='sub'>{_e(_subtitle(result))}</p>",
            _banner(result), _headline(result), _figures(result), _tables(result),
            _notes(result)]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(part for part in body if part) + "</body></html>\n")


def _subtitle(result: AuditResult) -> str:
    data, dense = result.dataset, result.dense
    models = dense.k + sum(b.k for b in result.populations)
    groups = f", groups: {', '.join(data.group_names)}" if data.group_names else ""
    return (f"{data.num_examples} {data.split} examples, {data.num_classes} classes"
            f"{groups}; {dense.k} dense model(s), {len(result.populations)} compressed "
            f"population(s), {models} models in all.")


# -- headline -------------------------------------------------------------------------------


def _banner(result: AuditResult) -> str:
    """Collapsed models, non-finite logits and one-seed CIEs, above everything else."""
    lines = result.warnings
    if not lines:
        return ""
    return ("<div class='banner'>Warning: " + "".join(f"<div>{_e(line)}</div>" for line in lines)
            + "</div>")


def _headline(result: AuditResult) -> str:
    dense = result.dense
    focus = result.focus_populations()
    cards = [_card("dense", f"{_pct(dense.accuracy.mean)}",
                   [f"{dense.k} model(s); worst class "
                    f"{_class(result, dense.worst_class)} at "
                    f"{_pct(dense.worst_class_recall)}",
                    f"ECE {_num(dense.values.get('ece'), 4)}"])]
    cards += [_focus_card(result, block) for block in focus]
    findings = [_finding(result, block) for block in focus]
    return ("<h2>Headline</h2>" + "".join(f"<p class='finding'>{_e(f)}</p>" for f in findings)
            + "<div class='cards'>" + "".join(cards) + "</div>" + _cie_growth(result))


def _focus_card(result: AuditResult, block: PopulationAudit) -> str:
    dense, cie = result.dense, block.cie
    delta = block.accuracy.mean - dense.accuracy.mean
    hurt = [c for c, test in enumerate(block.welch or [])
            if test.affected and test.direction == "hurt"]
    helped = [c for c, test in enumerate(block.welch or [])
              if test.affected and test.direction == "spared"]
    lines = [
        f"change <span class='{'bad' if delta < 0 else 'good'}'>{100 * delta:+.2f}</span> "
        f"points; {block.k} model(s)",
        f"worst class {_e(_class(result, block.worst_class))}: "
        f"{_pct(_at(dense.recall, block.worst_class))} &rarr; "
        f"{_pct(block.worst_class_recall)}",
        f"CIEs <b>{cie.count}</b> ({_pct(cie.fraction, 2)}); dense accuracy on them "
        f"<b>{_pct(cie.dense_accuracy_cie)}</b> vs {_pct(cie.dense_accuracy_rest)} "
        "on the rest",
        _welch_line(result, block.welch_summary, hurt, helped),
        f"flips {_num(block.flip_count, 1)} (vs the same-seed dense run); flip rate "
        f"{_pct(block.flip_rate, 2)}; ECE {_num(dense.values.get('ece'), 4)} &rarr; "
        f"{_num(block.values.get('ece'), 4)}",
    ]
    floor = _floor_of(result, block.label)
    if floor is not None:
        lines.append(_e(_floor_text(floor)))
    return _card(block.label, _pct(block.accuracy.mean), lines, escape=False)


def _floor_of(result: AuditResult, label: str) -> CIEVersusFloor | None:
    rows = result.noise_floor.cie_comparison if result.noise_floor else []
    return next((row for row in rows if row.label == label), None)


def _floor_text(row: CIEVersusFloor) -> str:
    if row.floor_size is None:
        return f"CIE noise floor: none ({row.note})"
    return (f"CIE noise floor (dense vs dense, {row.floor_size} a side): {row.floor_mean:.1f} "
            f"[{row.floor_min}, {row.floor_max}]; "
            + ("above its range" if row.above_range else "not above its range"))


def _welch_line(result: AuditResult, summary: WelchSummary | None, hurt: list[int],
                helped: list[int]) -> str:
    if summary is None:
        return "affected classes: needs 2+ seeds a side"
    names = lambda classes: ", ".join(_e(_class(result, c)) for c in classes) or "none"  # noqa: E731
    return (f"Welch ({_e(summary.correction)}): classes hurt {names(hurt)}; relatively "
            f"spared {names(helped)} <span class='muted'>({summary.affected_uncorrected} of "
            f"{summary.tested} uncorrected at p &lt; {summary.alpha:g}; "
            f"{summary.expected_false_uncorrected:.1f} expected by chance)</span>")


def _finding(result: AuditResult, block: PopulationAudit) -> str:
    cie = block.cie
    delta = block.accuracy.mean - result.dense.accuracy.mean
    text = (f"{block.label} ({block.k} seed(s)): accuracy changes by {100 * delta:+.2f} "
            f"points, but {cie.count} examples ({_pct(cie.fraction, 2)}) are "
            f"compression-identified ({cie.definition}); the dense models score "
            f"{_pct(cie.dense_accuracy_cie)} on them against "
            f"{_pct(cie.dense_accuracy_rest)} on the rest.")
    return text + (f" Note: {cie.warning}." if cie.warning else "")


def _cie_growth(result: AuditResult) -> str:
    methods = {b.method for b in result.focus_populations()}
    rows = [[b.label, b.k, b.cie.count, _num(b.flip_count, 1), _pct(b.cie.fraction, 2),
             _pct(b.cie.dense_accuracy_cie), _pct(b.cie.dense_accuracy_rest),
             _pct(b.accuracy.mean)]
            for b in result.populations if b.method in methods]
    return ("<p class='muted'>CIEs by sparsity for the focus method(s):</p>"
            + _table(["population", "seeds", "CIEs", "flips", "CIE fraction",
                      "dense acc. on CIEs", "dense acc. on rest", "accuracy"], rows))


def _card(title: str, big: str, lines: Sequence[str], *, escape: bool = True) -> str:
    items = "".join(f"<div>{_e(line) if escape else line}</div>" for line in lines)
    return (f"<div class='card'><h3>{_e(title)}</h3><div class='big'>{_e(big)}</div>"
            f"{items}</div>")


# -- figures --------------------------------------------------------------------------------


def _figures(result: AuditResult) -> str:
    parts = ["<h2>Figures</h2>",
             _figure(figures.accuracy_figure(result), "accuracy against sparsity",
                     "Accuracy against direct (left) and effective (right) sparsity; bars are "
                     "the range over seeds, or a Wilson 95% interval for a single model. Look "
                     "for methods whose effective sparsity runs ahead of the direct one."),
             _figure(figures.heatmap_figure(result), "normalised recall change heatmap",
                     "Per class and sparsity: change in class recall minus change in overall "
                     "accuracy (points; Hooker et al.). Red cells are classes that pay more "
                     "than the average.")]
    parts.append(_figure(figures.cie_counts_figure(result), "CIEs per class",
                         "Compression-identified exemplars per true class: where the modal "
                         "labels of the dense and compressed populations part ways."))
    for label in result.focus:
        parts.append(_figure(figures.cie_grid_figure(result, label), f"CIE images {label}",
                             f"CIEs of {label}: y = true label, d = dense modal label, c = "
                             "compressed modal label; green titles are examples the dense "
                             "population got right and the compressed one lost."))
        parts.append(_cie_texts(result, label))
    parts += [
        _figure(figures.reliability_figure(result), "reliability diagrams",
                "Reliability diagrams (all models of a population pooled): points below the "
                "diagonal are over-confident."),
        _figure(figures.layers_figure(result), "per-layer sparsity",
                "Per-layer sparsity of the focus populations: hatched bars above plain ones "
                "mean weights cut off from every input-output path."),
        _figure(figures.roc_figure(result, "cie"), "risk ROC curves",
                "How well signals of the dense models alone predict which examples become "
                "CIEs (AUROC in the legend; 0.5 is chance)."),
    ]
    return "\n".join(p for p in parts if p)


def _cie_texts(result: AuditResult, label: str) -> str:
    """The CIEs of a text dataset as a table: the text, its label and both modal labels."""
    entry = (result.images or {}).get(label) or {}
    if "texts" not in entry:
        return ""
    classes = result.dataset.classes
    rows = [[text, classes[y], classes[d], classes[c]] for text, y, d, c in zip(
        entry["texts"], entry["labels"], entry["dense_modal"], entry["compressed_modal"],
        strict=True)]
    return (f"<h3>CIE texts {_e(label)}</h3><p class='note'>Compression-identified exemplars of "
            f"{_e(label)} (those the dense population got right first): the true label, the "
            "dense and the compressed populations' modal labels.</p>"
            + _table(["text", "label", "dense", "compressed"], rows))


def _figure(uri: str | None, alt: str, caption: str) -> str:
    if uri is None:
        return ""
    return (f"<figure><img src='{uri}' alt='{_e(alt)}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


# -- tables ---------------------------------------------------------------------------------


def _tables(result: AuditResult) -> str:
    parts = [_nested(result), "<h2>Noise floor</h2>", _noise_floor(result),
             "<h2>Worst classes and groups</h2>", _worst_classes(result), _groups(result),
             "<h2>Remedies: overall, worst-class and harmed-class accuracy</h2>",
             _remedies(result),
             "<h2>Risk before pruning</h2>", _risk(result),
             "<h2>Representations: Q-score and prediction depth</h2>", _representations(result),
             "<h2>Sparsity and cost</h2>", _cost(result),
             "<h2>Every population</h2>", _all_populations(result)]
    return "\n".join(p for p in parts if p)


def _nested(result: AuditResult) -> str:
    """ELSA's levels together, as compressed models of one dense network, each beside the
    populations trained separately at its sparsity (empty without nested populations)."""
    if not result.nested:
        return ""
    tables = [f"<p class='muted'>{_e(network.method)}: levels "
              f"{', '.join(f'{level.sparsity:g}' for level in network.levels)}</p>"
              + _table(["level", "population", "seeds", "accuracy", "vs dense (pts)", "CIEs",
                        "flips", "worst class (recall)", "trained separately", "seeds",
                        "accuracy", "CIEs", "level minus separate (pts)"],
                       _nested_rows(result, network))
              for network in result.nested]
    return ("<h2>Levels of one dense network</h2><p class='muted'>Each level is a sparse "
            "network inside one dense model (one checkpoint; a level is picked by zeroing "
            "weights along its mask) and is audited as a compressed model of the dense "
            "network, its dense level included. Beside it: the populations trained separately "
            "at the same sparsity (the dense population itself for the dense level). Each "
            "level's per-class change is in the heatmap and in the table of every "
            "population.</p>" + "".join(tables))


def _nested_rows(result: AuditResult, network: NestedNetwork) -> list[list]:
    blocks = {block.label: block for block in [result.dense, *result.populations]}
    dense = result.dense.accuracy.mean
    rows = []
    for level in network.levels:
        block = blocks.get(level.population)
        if block is None:
            head = [f"{level.sparsity:g}", "not audited", "-", "-", "-", "-", "-", "-"]
        else:
            head = [f"{level.sparsity:g}", block.label, block.k, _pct(block.accuracy.mean),
                    _signed(_points(block.accuracy.mean - dense)), block.cie.count,
                    _num(block.flip_count, 1),
                    f"{_class(result, block.worst_class)} ({_pct(block.worst_class_recall)})"]
        others = [blocks[label] for label in level.separate if label in blocks]
        for other in others or [None]:
            if other is None:
                rows.append(head + ["none", "-", "-", "-", "-"])
                continue
            gap = None if block is None else _points(block.accuracy.mean - other.accuracy.mean)
            rows.append(head + [other.label, other.k, _pct(other.accuracy.mean),
                                other.cie.count if other.cie else "-", _signed(gap)])
    return rows


def _noise_floor(result: AuditResult) -> str:
    """Churn, accuracy spread and weight distance per population, then each compressed
    population's CIEs beside the dense-vs-dense floor of its size (Zhuang et al. 2022)."""
    floor = result.noise_floor
    if floor is None:
        return "<p class='muted'>This audit carries no noise floor.</p>"
    rows = [_noise_row(block) for block in floor.populations]
    cie_rows = [[row.label, row.k, row.count, row.floor_size or "-",
                 _num(row.floor_mean, 1),
                 "-" if row.floor_size is None else f"[{row.floor_min}, {row.floor_max}]",
                 _num(row.excess, 1),
                 "-" if row.above_range is None else "yes" if row.above_range else "no",
                 row.note or ""] for row in floor.cie_comparison]
    splits = "; ".join(f"{f.size} a side: {f.splits} {'(all)' if f.exhaustive else '(sampled)'}"
                       for f in floor.cie_floors) or "none"
    return ("<p class='muted'>Models that differ only in noise (seed; thread count for the "
            "'threads' population) already disagree: churn is the fraction of examples two "
            "models label differently (one minus the agreement of Zhuang et al.'s get_churn), "
            "over every pair; the standard deviations are over the models (per class: the "
            "largest and the mean over the classes); weight distance is the L2 norm of the "
            "difference of two models' parameters.</p>"
            + _table(["population", "differ in", "models", "pairs", "churn mean",
                      "churn [min, max]", "accuracy std (pts)", "class acc. std max (pts)",
                      "class acc. std mean (pts)", "weight L2 mean", "weight L2 [min, max]",
                      "note"], rows)
            + "<p class='muted'>CIEs against the floor: the CIEs that two disjoint dense "
            "populations of the same size produce against each other, over balanced splits "
            f"of the dense models ({_e(splits)}). A count inside the floor's range is "
            "indistinguishable from seed noise.</p>"
            + _table(["population", "seeds", "CIEs", "floor size", "floor mean",
                      "floor [min, max]", "excess", "above range", "note"], cie_rows))


def _noise_row(block: PopulationNoise) -> list:
    churn, weights, std = block.churn, block.weight_distance, block.per_class_accuracy_std
    classes = [v for v in std or [] if v is not None]
    return [block.label, block.kind, block.k, block.pairs, _pct(churn and churn.mean, 2),
            f"[{_pct(churn.min, 2)}, {_pct(churn.max, 2)}]" if churn else "-",
            _num(_points(block.accuracy_std), 2),
            _num(_points(max(classes)) if classes else None, 2),
            _num(_points(sum(classes) / len(classes)) if classes else None, 2),
            _num(weights and weights.mean, 3),
            f"[{weights.min:.3f}, {weights.max:.3f}]" if weights else "-", block.note or ""]


def _representations(result: AuditResult) -> str:
    """Q-score and prediction depth (Corti et al. 2022) of the dense models, and of each
    compressed population's models on its CIEs vs the rest (the dense models on the same
    examples beside them): mean [q1, q3] over (model, example) pairs."""
    rows = []
    dense = result.dense.representations
    if dense is not None:
        rows.append(["dense", "all", dense.q_score.count, _dist(dense.q_score),
                     _dist(dense.prediction_depth), "-", "-"])
    for block in result.populations:
        reps = block.representations
        if reps is None or reps.q_score_cie is None or reps.prediction_depth_cie is None:
            continue
        q, depth = reps.q_score_cie, reps.prediction_depth_cie
        for part in ("cie", "rest"):
            rows.append([block.label, "CIEs" if part == "cie" else "rest",
                         getattr(q, part).count, _dist(getattr(q, part)),
                         _dist(getattr(depth, part)), _dist(getattr(q, f"dense_{part}")),
                         _dist(getattr(depth, f"dense_{part}"))])
    if not rows:
        return ("<p class='muted'>No representation metrics (predictions cached before they "
                "existed, or not computed).</p>")
    settings = dense or next(b.representations for b in result.populations
                             if b.representations is not None)
    return (f"<p class='muted'>Q-score: the z-score, within an example, of its "
            f"{settings.top} largest-magnitude penultimate coordinate(s) (Kalibhat et al. "
            "2022, as we read it). Prediction depth: the earliest of the "
            f"{settings.layers} probed layers from which {settings.k}-NN probes on "
            f"{settings.bank} training examples agree with the final prediction at every "
            "later layer (Baldock et al. 2021). Mean [q1, q3] over (model, example) pairs; "
            "the dense columns are the dense models on the same examples.</p>"
            + _table(["population", "examples", "pairs", "Q-score", "prediction depth",
                      "dense Q-score", "dense depth"], rows))


def _dist(d) -> str:
    if d is None or d.mean is None:
        return "-"
    return f"{d.mean:.2f} [{d.q1:.2f}, {d.q3:.2f}]"


def _worst_classes(result: AuditResult, count: int = 5) -> str:
    dense, classes = result.dense, result.dataset.classes
    rows = []
    for block in result.focus_populations():
        change = block.normalised_change or [None] * len(block.recall)
        order = sorted(range(len(block.recall)),
                       key=lambda c: change[c] if change[c] is not None else 0)[:count]
        ci = block.by_class["accuracy"].ci
        for c in order:
            test = block.welch[c] if block.welch else None
            interval = ci.by_group.get(classes[c]) if ci else None
            rows.append([block.label, _class(result, c), _pct(dense.recall[c]),
                         _pct(block.recall[c]) + (f" [{_pct(interval[0])}, {_pct(interval[1])}]"
                                                  if interval else ""),
                         _num(_points(change[c]), 2),
                         _num(test and test.t, 2), _num(test and test.p, 4),
                         _num(test and test.p_holm, 4),
                         "yes" if test and test.affected else "no" if test else "-"])
    return ("<p class='muted'>Classes that lost most relative to the overall change, with the "
            "bootstrap 95% interval of the compressed recall and Welch's test against the dense "
            "population.</p>"
            + _table(["population", "class", "dense recall", "compressed recall",
                      "normalised change (pts)", "Welch t", "p", "p (Holm)", "affected"],
                     rows))


def _remedies(result: AuditResult) -> str:
    """One row per population (dense first): overall accuracy, worst-class accuracy and the
    harmed class's recall, each with its interval over seeds (:mod:`.remedies`)."""
    table = remedies(result)
    harmed = table.harmed_class
    name = _class(result, harmed)
    dense = table.rows[0].harmed
    rows = [[row.label, row.k, _pct(row.accuracy.mean), _interval(row.accuracy.interval),
             _pct(row.worst and row.worst.mean), _interval(row.worst and row.worst.interval),
             "-" if row.worst_class is None
             else f"{_class(result, row.worst_class)} ({row.worst_models} of {row.k})",
             _pct(row.harmed and row.harmed.mean), _interval(row.harmed and row.harmed.interval),
             _signed(_points(_change(row.harmed, dense)))] for row in table.rows]
    focus = ", ".join(result.focus) or "none"
    harm = ("No class has a recall in the dense and every focus population" if harmed is None
            else f"The harmed class is {name}: the class whose recall the focus populations "
            f"({focus}) lose most against dense, argmax over the classes of the mean over the "
            "focus populations of (dense recall - population recall), each population's "
            "recall the mean over its models; it loses "
            f"{_num(_points(table.harmed_drop), 2)} points")
    return ("<p class='muted'>One row per population, dense first, then each compressed "
            "population (sparse models and remedies such as data-pruned or robustly distilled "
            "ones, whatever the audit holds). Accuracy: mean over the models and the range over "
            "seeds (Wilson 95% for a single model). Worst-class accuracy: per model its lowest "
            "class recall, then the mean and [min, max] over the models; beside it the class "
            f"that is worst in most models (ties to the lowest index). {_e(harm)}; its recall "
            "per population is the mean and [min, max] over the models, and its change "
            "against dense in points. Intervals over seeds need two models or more ('-').</p>"
            + _table(["population", "seeds", "accuracy", "interval", "worst-class acc.",
                      "over seeds", "worst class (models)", f"harmed class ({name}) recall",
                      "over seeds",
                      "vs dense (pts)"], rows))


def _interval(interval: Sequence[float] | None) -> str:
    return "-" if not interval else f"[{_pct(interval[0])}, {_pct(interval[1])}]"


def _change(value: OverSeeds | None, dense: OverSeeds | None) -> float | None:
    return None if value is None or dense is None else value.mean - dense.mean


def _groups(result: AuditResult) -> str:
    if not result.dataset.group_names:
        return ("<p class='muted'>This dataset has no group labels; the class rows above are "
                "its disaggregation.</p>")
    blocks = [result.dense, *result.focus_populations()]
    rows = []
    for block in blocks:
        for metric, entry in (block.by_group or {}).items():
            ci = entry.ci
            for name, value in entry.by_group.items():
                interval = ci.by_group.get(name) if ci else None
                rows.append([_e(block.label), _e(metric.replace("_", " ")), _e(name),
                             _pct(value) + (f" [{_pct(interval[0])}, {_pct(interval[1])}]"
                                            if interval else "")])
            rows.append([_e(block.label), _e(metric.replace("_", " ")), "<i>difference</i>",
                         _pct(entry.difference) + (
                             f" [{_pct(ci.difference[0])}, {_pct(ci.difference[1])}]"
                             if ci and ci.difference else "")])
    out = _table(["population", "metric", "group", "value [95% CI]"], rows, raw=True)
    ba_rows = [[b.label, attribute, _num(entry.value, 4), entry.reason or ""]
               for b in blocks for attribute, entry in (b.bias_amplification or {}).items()]
    if ba_rows:
        out += ("<p class='muted'>Bias amplification (Iofinova et al.): positive values mean the "
                "model over-predicts the attribute in the group where training made it more "
                "common.</p>" + _table(["population", "attribute", "BA", "why undefined"],
                                       ba_rows))
    return out


def _risk(result: AuditResult) -> str:
    rows = []
    for block in result.focus_populations():
        if block.risk is None:
            continue
        for name in result.risk_signals:
            cie, flip = block.risk.cie[name], block.risk.flip[name]
            rows.append([block.label, figures.SIGNAL_NAMES.get(name, name),
                         _num(cie.auroc, 3), _pct(cie.precision_at_k),
                         _num(flip.auroc, 3), _pct(flip.precision_at_k)])
    return ("<p class='muted'>Signals computed on the dense models alone. Precision at k uses k "
            "= the number of CIEs (or flipped examples); the base rate is the fraction of "
            "positives.</p>"
            + _table(["population", "signal", "CIE AUROC", "CIE precision@k", "flip AUROC",
                      "flip precision@k"], rows))


def _cost(result: AuditResult) -> str:
    blocks = [result.dense, *result.focus_populations()]
    rows = []
    for block in blocks:
        cost = block.models[0].cost
        if not cost:
            continue
        rows.append([block.label, f"{cost['params']:,}", f"{cost['nonzeros']:,}",
                     _num(cost["sparsity"], 4), _num(cost["effective_sparsity"], 4),
                     f"{cost['flops_dense']:,}", f"{cost['flops_sparse']:,}",
                     _kib(cost["size_dense_bytes"]), _kib(cost["size_sparse_bytes"]),
                     _kib(cost["file_bytes"]), _num(cost["latency_ms_single"], 3),
                     _num(cost["latency_ms_batch"], 2)])
    return ("<p class='muted'>Per example FLOPs count a multiply-add as 2 (Linear/Conv only); "
            "the compressed size stores nonzeros plus a 1-bit mask; latency is measured on "
            "this CPU with dense kernels (ms; batch of 1 and of "
            f"{_batch(blocks)}).</p>"
            + _table(["model", "params", "nonzero weights", "direct sparsity",
                      "effective sparsity", "FLOPs dense", "FLOPs sparse", "size dense",
                      "size compressed", "checkpoint file", "latency 1", "latency batch"], rows))


def _all_populations(result: AuditResult) -> str:
    """One row per population: accuracy, sparsity, worst class, CIEs and flips, then one column
    per entry of the audit's metric table (``metric_columns``, population aggregates)."""
    rows = []
    for block in [result.dense, *result.populations]:
        acc, cie = block.accuracy, block.cie
        row = [block.label, block.k, _pct(acc.mean),
               f"[{_pct(acc.interval[0])}, {_pct(acc.interval[1])}]",
               _num(block.direct_sparsity, 4), _num(block.effective_sparsity, 4),
               _class(result, block.worst_class), _pct(block.worst_class_recall),
               cie.count if cie else "-", _num(block.flip_count, 1), _pct(block.flip_rate, 2)]
        for column in result.metric_columns:
            value = block.values.get(column.name)
            row.append(_pct(value, 2) if column.percent else _num(value, 4))
        rows.append(row)
    return _table(["population", "seeds", "accuracy", "interval", "direct", "effective",
                   "worst class", "its recall", "CIEs", "flips", "flip rate",
                   *[c.label for c in result.metric_columns]], rows)


def _notes(result: AuditResult) -> str:
    settings = result.settings
    return (
        "<h2>Definitions</h2><ul class='muted'>"
        "<li>CIE (compression-identified exemplar): the modal label of the compressed "
        "population differs from the dense population's; ties go to the largest label "
        "(Hooker et al. 2019, 2020). A population of one model has that model's prediction "
        "as its 'modal' label, so its CIEs include that seed's own noise. Flips: examples "
        "where a compressed model disagrees with the dense run of the same seed (the mean "
        "over the population's models).</li>"
        "<li>Affected class: Welch's t-test on per-model class recall minus the population's "
        "mean accuracy, dense vs compressed, Holm-Bonferroni adjusted p &lt; "
        f"{settings.alpha} over the classes tested (at the uncorrected threshold, "
        "alpha x classes would be marked by chance alone); a class with the same recall in "
        "every model gets no test and is affected only when the two recalls differ.</li>"
        "<li>ECE: 10 bins floor(10p)/10 of the max-probability (Iofinova et al. 2023, "
        "multi-class analogue); bias amplification and the 0.1&lt;p&lt;0.9 uncertainty follow "
        "their code.</li>"
        f"<li>Bootstrap intervals: {settings.n_boot} resamples of the examples "
        "(Fairlearn MetricFrame), for the dense and focus populations.</li></ul>"
        f"<p class='muted'>Audit file version {_e(result.version)}; analysis took "
        f"{_num(result.seconds.get('analysis'), 1)} s beyond predictions.</p>")


# -- formatting -----------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence], *, raw: bool = False) -> str:
    head = "".join(f"<th class='{'l' if i == 0 else ''}'>{_e(h)}</th>"
                   for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f"<td class='{'' if _numeric(cell) and i else 'l'}'>"
                         f"{cell if raw and isinstance(cell, str) else _e(cell)}</td>"
                         for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _numeric(cell) -> bool:
    text = str(cell).lstrip("[+-")
    return not text or text[0].isdigit() or text == "-"


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _pct(value, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _signed(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def _points(value):
    return None if value is None else 100 * value


def _kib(value) -> str:
    return "-" if value is None else f"{value / 1024:,.1f} KiB"


def _at(values: Sequence, index: int | None):
    return None if index is None else values[index]


def _class(result: AuditResult, index: int | None) -> str:
    return "-" if index is None else str(result.dataset.classes[index])


def _batch(blocks: list[PopulationAudit]) -> str:
    cost = blocks[0].models[0].cost or {}
    return str(cost.get("latency_batch_size", "-"))
