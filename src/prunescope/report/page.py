"""The report page: headline numbers first, then the figures with one-line captions, then tables.

Everything is inline (CSS in a ``<style>`` element, figures as data URIs); there is no script.
:func:`page` takes the typed :class:`~prunescope.audit.schema.AuditResult`; the warning banner
and the per-model metric columns read it directly, the older sections read its JSON form
(``to_dict()``), the same data by key.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from prunescope.audit.schema import AuditResult
from prunescope.report import figures

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
    audit = result.to_dict()
    data = audit["dataset"]
    title = f"Compression audit: {data['name']}"
    body = [f"<h1>{_e(title)}</h1>", f"<p class='sub'>{_e(_subtitle(audit))}</p>",
            _banner(result), _headline(audit), _figures(audit), _tables(audit, result),
            _notes(audit)]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(part for part in body if part) + "</body></html>\n")


def _subtitle(audit: dict) -> str:
    data, dense = audit["dataset"], audit["dense"]
    models = dense["k"] + sum(b["k"] for b in audit["populations"])
    groups = f", groups: {', '.join(data['group_names'])}" if data["group_names"] else ""
    return (f"{data['num_examples']} {data['split']} examples, {data['num_classes']} classes"
            f"{groups}; {dense['k']} dense model(s), {len(audit['populations'])} compressed "
            f"population(s), {models} models in all.")


# -- headline -------------------------------------------------------------------------------


def _banner(result: AuditResult) -> str:
    """Collapsed models, non-finite logits and one-seed CIEs, above everything else."""
    lines = result.warnings
    if not lines:
        return ""
    return ("<div class='banner'>Warning: " + "".join(f"<div>{_e(line)}</div>" for line in lines)
            + "</div>")


def _headline(audit: dict) -> str:
    dense = audit["dense"]
    focus = [b for b in audit["populations"] if b["label"] in audit["focus"]]
    cards = [_card("dense", f"{_pct(dense['accuracy']['mean'])}",
                   [f"{dense['k']} model(s); worst class "
                    f"{_class(audit, dense['worst_class'])} at "
                    f"{_pct(dense['worst_class_recall'])}",
                    f"ECE {_num(dense['values']['ece'], 4)}"])]
    cards += [_focus_card(audit, block) for block in focus]
    findings = [_finding(audit, block) for block in focus]
    return ("<h2>Headline</h2>" + "".join(f"<p class='finding'>{_e(f)}</p>" for f in findings)
            + "<div class='cards'>" + "".join(cards) + "</div>" + _cie_growth(audit))


def _focus_card(audit: dict, block: dict) -> str:
    dense = audit["dense"]
    delta = block["accuracy"]["mean"] - dense["accuracy"]["mean"]
    cie = block["cie"]
    welch = block.get("welch")
    hurt = [c for c, row in enumerate(welch or [])
            if row["affected"] and row["direction"] == "hurt"]
    helped = [c for c, row in enumerate(welch or [])
              if row["affected"] and row["direction"] == "spared"]
    lines = [
        f"change <span class='{'bad' if delta < 0 else 'good'}'>{100 * delta:+.2f}</span> "
        f"points; {block['k']} model(s)",
        f"worst class {_e(_class(audit, block['worst_class']))}: "
        f"{_pct(dense['recall'][block['worst_class']])} &rarr; "
        f"{_pct(block['worst_class_recall'])}",
        f"CIEs <b>{cie['count']}</b> ({_pct(cie['fraction'], 2)}); dense accuracy on them "
        f"<b>{_pct(cie['dense_accuracy_cie'])}</b> vs {_pct(cie['dense_accuracy_rest'])} "
        "on the rest",
        _welch_line(audit, block.get("welch_summary"), hurt, helped),
        f"flips {_num(block.get('flip_count'), 1)} (vs the same-seed dense run); flip rate "
        f"{_pct(block['flip_rate'], 2)}; ECE {_num(dense['values']['ece'], 4)} &rarr; "
        f"{_num(block['values']['ece'], 4)}",
    ]
    return _card(block["label"], _pct(block["accuracy"]["mean"]), lines, escape=False)


def _welch_line(audit: dict, summary: dict | None, hurt: list[int], helped: list[int]) -> str:
    if summary is None:
        return "affected classes: needs 2+ seeds a side"
    names = lambda classes: ", ".join(_e(_class(audit, c)) for c in classes) or "none"  # noqa: E731
    return (f"Welch ({_e(summary['correction'])}): classes hurt {names(hurt)}; relatively "
            f"spared {names(helped)} <span class='muted'>({summary['affected_uncorrected']} of "
            f"{summary['tested']} uncorrected at p &lt; {summary['alpha']:g}; "
            f"{summary['expected_false_uncorrected']:.1f} expected by chance)</span>")


def _finding(audit: dict, block: dict) -> str:
    cie = block["cie"]
    delta = block["accuracy"]["mean"] - audit["dense"]["accuracy"]["mean"]
    text = (f"{block['label']} ({block['k']} seed(s)): accuracy changes by {100 * delta:+.2f} "
            f"points, but {cie['count']} examples ({_pct(cie['fraction'], 2)}) are "
            f"compression-identified ({cie['definition']}); the dense models score "
            f"{_pct(cie['dense_accuracy_cie'])} on them against "
            f"{_pct(cie['dense_accuracy_rest'])} on the rest.")
    return text + (f" Note: {cie['warning']}." if cie.get("warning") else "")


def _cie_growth(audit: dict) -> str:
    methods = {b["method"] for b in audit["populations"] if b["label"] in audit["focus"]}
    rows = [[b["label"], b["k"], b["cie"]["count"], _num(b.get("flip_count"), 1),
             _pct(b["cie"]["fraction"], 2),
             _pct(b["cie"]["dense_accuracy_cie"]), _pct(b["cie"]["dense_accuracy_rest"]),
             _pct(b["accuracy"]["mean"])]
            for b in audit["populations"] if b["method"] in methods]
    return ("<p class='muted'>CIEs by sparsity for the focus method(s):</p>"
            + _table(["population", "seeds", "CIEs", "flips", "CIE fraction",
                      "dense acc. on CIEs", "dense acc. on rest", "accuracy"], rows))


def _card(title: str, big: str, lines: Sequence[str], *, escape: bool = True) -> str:
    items = "".join(f"<div>{_e(line) if escape else line}</div>" for line in lines)
    return (f"<div class='card'><h3>{_e(title)}</h3><div class='big'>{_e(big)}</div>"
            f"{items}</div>")


# -- figures --------------------------------------------------------------------------------


def _figures(audit: dict) -> str:
    parts = ["<h2>Figures</h2>",
             _figure(figures.accuracy_figure(audit), "accuracy against sparsity",
                     "Accuracy against direct (left) and effective (right) sparsity; bars are "
                     "the range over seeds, or a Wilson 95% interval for a single model. Look "
                     "for methods whose effective sparsity runs ahead of the direct one."),
             _figure(figures.heatmap_figure(audit), "normalised recall change heatmap",
                     "Per class and sparsity: change in class recall minus change in overall "
                     "accuracy (points; Hooker et al.). Red cells are classes that pay more "
                     "than the average.")]
    parts.append(_figure(figures.cie_counts_figure(audit), "CIEs per class",
                         "Compression-identified exemplars per true class: where the modal "
                         "labels of the dense and compressed populations part ways."))
    for label in audit["focus"]:
        parts.append(_figure(figures.cie_grid_figure(audit, label), f"CIE images {label}",
                             f"CIEs of {label}: y = true label, d = dense modal label, c = "
                             "compressed modal label; green titles are examples the dense "
                             "population got right and the compressed one lost."))
    parts += [
        _figure(figures.reliability_figure(audit), "reliability diagrams",
                "Reliability diagrams (all models of a population pooled): points below the "
                "diagonal are over-confident."),
        _figure(figures.layers_figure(audit), "per-layer sparsity",
                "Per-layer sparsity of the focus populations: hatched bars above plain ones "
                "mean weights cut off from every input-output path."),
        _figure(figures.roc_figure(audit, "cie"), "risk ROC curves",
                "How well signals of the dense models alone predict which examples become "
                "CIEs (AUROC in the legend; 0.5 is chance)."),
    ]
    return "\n".join(p for p in parts if p)


def _figure(uri: str | None, alt: str, caption: str) -> str:
    if uri is None:
        return ""
    return (f"<figure><img src='{uri}' alt='{_e(alt)}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


# -- tables ---------------------------------------------------------------------------------


def _tables(audit: dict, result: AuditResult) -> str:
    parts = ["<h2>Worst classes and groups</h2>", _worst_classes(audit), _groups(audit),
             "<h2>Risk before pruning</h2>", _risk(audit),
             "<h2>Sparsity and cost</h2>", _cost(audit),
             "<h2>Every population</h2>", _all_populations(result)]
    return "\n".join(p for p in parts if p)


def _worst_classes(audit: dict, count: int = 5) -> str:
    dense = audit["dense"]
    rows = []
    for block in [b for b in audit["populations"] if b["label"] in audit["focus"]]:
        recall = block["recall"]
        order = sorted(range(len(recall)), key=lambda c: (block["normalised_change"][c]
                                                          if block["normalised_change"][c]
                                                          is not None else 0))[:count]
        for c in order:
            welch = (block.get("welch") or [None] * len(recall))[c]
            ci = block["by_class"]["accuracy"].get("ci", {}).get("by_group", {})
            interval = ci.get(audit["dataset"]["classes"][c])
            rows.append([block["label"], _class(audit, c), _pct(dense["recall"][c]),
                         _pct(recall[c]) + (f" [{_pct(interval[0])}, {_pct(interval[1])}]"
                                            if interval else ""),
                         _num(_points(block["normalised_change"][c]), 2),
                         _num(welch and welch["t"], 2), _num(welch and welch["p"], 4),
                         _num(welch and welch.get("p_holm"), 4),
                         "yes" if welch and welch["affected"] else "no" if welch else "-"])
    return ("<p class='muted'>Classes that lost most relative to the overall change, with the "
            "bootstrap 95% interval of the compressed recall and Welch's test against the dense "
            "population.</p>"
            + _table(["population", "class", "dense recall", "compressed recall",
                      "normalised change (pts)", "Welch t", "p", "p (Holm)", "affected"],
                     rows))


def _groups(audit: dict) -> str:
    if not audit["dataset"]["group_names"]:
        return ("<p class='muted'>This dataset has no group labels; the class rows above are "
                "its disaggregation.</p>")
    blocks = [audit["dense"]] + [b for b in audit["populations"] if b["label"] in audit["focus"]]
    rows = []
    for block in blocks:
        for metric, entry in block["by_group"].items():
            ci = entry.get("ci", {})
            for name, value in entry["by_group"].items():
                interval = ci.get("by_group", {}).get(name)
                rows.append([_e(block["label"]), _e(metric.replace("_", " ")), _e(name),
                             _pct(value) + (f" [{_pct(interval[0])}, {_pct(interval[1])}]"
                                            if interval else "")])
            rows.append([_e(block["label"]), _e(metric.replace("_", " ")), "<i>difference</i>",
                         _pct(entry["difference"]) + (
                             f" [{_pct(ci['difference'][0])}, {_pct(ci['difference'][1])}]"
                             if ci.get("difference") else "")])
    out = _table(["population", "metric", "group", "value [95% CI]"], rows, raw=True)
    ba_rows = [[b["label"], attribute, _num(entry.get("value"), 4), entry.get("reason", "")]
               for b in blocks for attribute, entry in (b.get("bias_amplification") or {}).items()]
    if ba_rows:
        out += ("<p class='muted'>Bias amplification (Iofinova et al.): positive values mean the "
                "model over-predicts the attribute in the group where training made it more "
                "common.</p>" + _table(["population", "attribute", "BA", "why undefined"],
                                       ba_rows))
    return out


def _risk(audit: dict) -> str:
    rows = []
    for block in [b for b in audit["populations"] if b["label"] in audit["focus"]]:
        for name in audit["risk_signals"]:
            cie, flip = block["risk"]["cie"][name], block["risk"]["flip"][name]
            rows.append([block["label"], figures.SIGNAL_NAMES.get(name, name),
                         _num(cie["auroc"], 3), _pct(cie["precision_at_k"]),
                         _num(flip["auroc"], 3), _pct(flip["precision_at_k"])])
    return ("<p class='muted'>Signals computed on the dense models alone. Precision at k uses k "
            "= the number of CIEs (or flipped examples); the base rate is the fraction of "
            "positives.</p>"
            + _table(["population", "signal", "CIE AUROC", "CIE precision@k", "flip AUROC",
                      "flip precision@k"], rows))


def _cost(audit: dict) -> str:
    blocks = [audit["dense"]] + [b for b in audit["populations"] if b["label"] in audit["focus"]]
    rows = []
    for block in blocks:
        cost = block["models"][0].get("cost")
        if not cost:
            continue
        rows.append([block["label"], f"{cost['params']:,}", f"{cost['nonzeros']:,}",
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
    classes = result.dataset.classes
    rows = []
    for block in [result.dense, *result.populations]:
        acc, cie = block.accuracy, block.cie
        row = [block.label, block.k, _pct(acc.mean),
               f"[{_pct(acc.interval[0])}, {_pct(acc.interval[1])}]",
               _num(block.direct_sparsity, 4), _num(block.effective_sparsity, 4),
               "-" if block.worst_class is None else classes[block.worst_class],
               _pct(block.worst_class_recall), cie.count if cie else "-",
               _num(block.flip_count, 1), _pct(block.flip_rate, 2)]
        for column in result.metric_columns:
            value = block.values.get(column.name)
            row.append(_pct(value, 2) if column.percent else _num(value, 4))
        rows.append(row)
    return _table(["population", "seeds", "accuracy", "interval", "direct", "effective",
                   "worst class", "its recall", "CIEs", "flips", "flip rate",
                   *[c.label for c in result.metric_columns]], rows)


def _notes(audit: dict) -> str:
    settings = audit.get("settings", {})
    seconds = audit.get("seconds") or {}
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
        f"{settings.get('alpha', 0.05)} over the classes tested (at the uncorrected threshold, "
        "alpha x classes would be marked by chance alone); a class with the same recall in "
        "every model gets no test and is affected only when the two recalls differ.</li>"
        "<li>ECE: 10 bins floor(10p)/10 of the max-probability (Iofinova et al. 2023, "
        "multi-class analogue); bias amplification and the 0.1&lt;p&lt;0.9 uncertainty follow "
        "their code.</li>"
        f"<li>Bootstrap intervals: {settings.get('n_boot', 0)} resamples of the examples "
        "(Fairlearn MetricFrame), for the dense and focus populations.</li></ul>"
        f"<p class='muted'>Audit file version {_e(audit['version'])}; analysis took "
        f"{_num(seconds.get('analysis'), 1)} s beyond predictions.</p>")


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


def _points(value):
    return None if value is None else 100 * value


def _kib(value) -> str:
    return "-" if value is None else f"{value / 1024:,.1f} KiB"


def _class(audit: dict, index) -> str:
    return "-" if index is None else str(audit["dataset"]["classes"][index])


def _batch(blocks: list[dict]) -> str:
    cost = blocks[0]["models"][0].get("cost") or {}
    return str(cost.get("latency_batch_size", "-"))
