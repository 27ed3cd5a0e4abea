"""The evaluation report: report.json (every figure), PNG charts, and report.html, which embeds the charts so
the one file can be mailed or attached to a ticket."""

from __future__ import annotations

import base64
import html
import math
import textwrap
from pathlib import Path
from typing import Any

from keel.core.artifact import write_json_atomic

# The main figure of each kind of set, charted across sets (the tables show every figure).
HEADLINE = {"pairs": "accuracy", "bias": "accuracy", "labelled": "f1", "refusal": "refusal_rate",
            "compliance": "safe_compliance_rate", "toxicity": "toxic_rate", "bold": "toxic_rate",
            "moderation": "flag_rate"}
KIND_TITLES = {
    "pairs": "Pairwise accuracy (share of pairs where the preferred response scores higher; 0.5 = chance)",
    "bias": "Bias probes: share of pairs where the stereotyped sentence scores higher (0.5 = unbiased)",
    "labelled": "Reward heads as moderation categories: precision and recall at their stand-in thresholds",
    "moderation": "Moderation model: share of each set flagged at the served thresholds",
    "refusal": "Refusal rate on harmful requests (higher is safer)",
    "compliance": "XSTest: compliance with safe prompts, refusal of unsafe ones",
    "toxicity": "Toxicity of continuations as the reward model judges it (flag rate; lower is better)",
    "bold": "BOLD: flag rate and harmless score of continuations, per group",
    "choices": "Multiple choice by answer likelihood",
}
COLORS = ["#4C72B0", "#DD8452"]
MIN_BIN = 5  # reliability bins with fewer pairs are too noisy to draw
MAX_CHARTED = 25  # categories per chart


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path: Path, title: str, groups: list[str], series: dict[str, list[float | None]],
              reference: float | None = None, ylabel: str = "",
              intervals: dict[str, list[tuple[float, float] | None]] | None = None) -> Path:
    """Grouped bars: one group per label in `groups`, one bar per series (model); horizontal when many.
    `intervals` (per series, per group) are drawn as error bars: how far apart two bars must be to differ."""
    plt = _pyplot()
    horizontal = len(groups) > 8
    size = (9, 0.32 * len(groups) * max(1, len(series)) + 1.5) if horizontal else (max(5.0, 1.1 * len(groups) + 2), 3.8)
    figure, axis = plt.subplots(figsize=size)
    width = 0.8 / max(1, len(series))
    for s, (name, values) in enumerate(series.items()):
        positions = [g + (s - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [v if v is not None and not math.isnan(v) else 0.0 for v in values]
        errors = None
        if intervals:  # asymmetric whiskers; NaN draws none where a bar has no interval
            bounds = intervals.get(name) or [None] * len(heights)
            errors = [[h - b[0] if b else math.nan for h, b in zip(heights, bounds)],
                      [b[1] - h if b else math.nan for h, b in zip(heights, bounds)]]
        if horizontal:
            axis.barh(positions, heights, height=width, label=name, color=COLORS[s % 2], xerr=errors, capsize=2)
        else:
            axis.bar(positions, heights, width=width, label=name, color=COLORS[s % 2], yerr=errors, capsize=2)
    known = [v for values in series.values() for v in values if v is not None and not math.isnan(v)]
    if known and min(known) >= 0 and max(known) <= 1:  # rates and accuracies: always the full 0-1 scale
        (axis.set_xlim if horizontal else axis.set_ylim)(0, 1.05)
    if horizontal:
        axis.set_yticks(range(len(groups)), groups, fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel(ylabel)
        if reference is not None:
            axis.axvline(reference, color="grey", linestyle="--", linewidth=1)
    else:
        axis.set_xticks(range(len(groups)), groups, rotation=25 if len(groups) > 3 else 0, ha="right" if len(groups) > 3 else "center", fontsize=8)
        axis.set_ylabel(ylabel)
        if reference is not None:
            axis.axhline(reference, color="grey", linestyle="--", linewidth=1)
    axis.set_title(textwrap.fill(title, 70), fontsize=10)
    axis.grid(alpha=0.3, axis="x" if horizontal else "y")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def reliability_chart(path: Path, report: dict[str, Any]) -> Path | None:
    """One reliability diagram per pair set: observed frequency against mean predicted probability."""
    sets = [(name, entry) for name, entry in report["sets"].items() if entry["kind"] == "pairs" and entry["models"]]
    if not sets:
        return None
    plt = _pyplot()
    columns = min(4, len(sets))
    rows = (len(sets) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
    for axis, (name, entry) in zip(axes.flat, sets):
        axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        for m, (label, result) in enumerate(entry["models"].items()):
            bins = [b for b in result["reliability"] if b["count"] >= MIN_BIN]
            axis.plot([b["mean_probability"] for b in bins], [b["frequency"] for b in bins], marker="o", markersize=3,
                      color=COLORS[m % 2], label=f"{label} (ECE {result['overall']['ece']:.3f})")
        axis.set_title(name, fontsize=9)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_xlabel("predicted P(preferred)", fontsize=8)
        axis.set_ylabel("observed frequency", fontsize=8)
        axis.legend(fontsize=6)
    for axis in list(axes.flat)[len(sets) :]:
        axis.axis("off")
    figure.suptitle(f"Reliability diagrams: sigma(r_a - r_b) against how often a is preferred (bins of {MIN_BIN}+ pairs)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value(result: dict[str, Any] | None, key: str) -> float | None:
    value = (result or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and _is_number(value) else None


def _interval(value: Any) -> tuple[float, float] | None:
    """A [low, high] pair of numbers (a figure's 95% interval, e.g. `accuracy_ci95`), else None."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value):
        return float(value[0]), float(value[1])
    return None


def largest(by_category: dict[str, dict[str, Any]]) -> list[str]:
    """The categories to chart: all of them, or the MAX_CHARTED with the most items (the tables list every one)."""
    if len(by_category) <= MAX_CHARTED:
        return list(by_category)
    size = {c: next((v[k] for k in ("n", "pairs", "examples") if k in v), 0) for c, v in by_category.items()}
    kept = set(sorted(by_category, key=lambda c: -size[c])[:MAX_CHARTED])
    return [c for c in by_category if c in kept]


def charts(report: dict[str, Any], folder: Path) -> dict[str, list[Path]]:
    """Every chart of the report, by section (set name or '_overview')."""
    labels = [m["label"] for m in report["models"]]
    made: dict[str, list[Path]] = {"_overview": []}
    active = {n: e for n, e in report["sets"].items() if e["models"]}
    for kind, metric in HEADLINE.items():  # one overview chart per kind: the headline figure of every set
        names = [n for n, e in active.items() if e["kind"] == kind]
        if names:
            series = {label: [_value(active[n]["models"][label]["overall"], metric) for n in names] for label in labels}
            intervals = {label: [_interval(active[n]["models"][label]["overall"].get(f"{metric}_ci95")) for n in names]
                         for label in labels}
            drawn = intervals if any(any(i) for i in intervals.values()) else None
            title = KIND_TITLES[kind] + ("; whiskers: 95% intervals" if drawn else "")
            reference = 0.5 if kind in ("pairs", "bias") else None
            made["_overview"].append(bar_chart(folder / f"overview_{kind}.png", title, names, series, reference,
                                               metric, drawn))
    if report["kind"] == "reward" and (path := reliability_chart(folder / "reliability.png", report)):
        made["_overview"].append(path)
    for name, entry in active.items():
        made[name] = []
        first = entry["models"][labels[0]]
        categories = largest(first.get("by_category", {}))
        of_all = "" if len(categories) == len(first.get("by_category", {})) else \
            f" (the {len(categories)} largest of {len(first['by_category'])})"
        slug = name.replace("/", "_")
        if entry["kind"] == "labelled":
            series = {f"{label} {what}": [_value(entry["models"][label]["by_category"][c], what) for c in categories]
                      for label in labels for what in ("precision", "recall")}
            made[name].append(bar_chart(folder / f"{slug}.png", f"{name}: precision and recall by category",
                                        categories, series))
        elif entry["kind"] == "choices":
            metrics = [k for k, v in first["overall"].items() if isinstance(v, float)]
            series = {label: [_value(entry["models"][label]["overall"], k) for k in metrics] for label in labels}
            made[name].append(bar_chart(folder / f"{slug}.png", f"{name}: overall", metrics, series))
            for metric in metrics if len(categories) > 1 else []:
                series = {label: [_value(entry["models"][label]["by_category"][c], metric) for c in categories] for label in labels}
                made[name].append(bar_chart(folder / f"{slug}_{metric}.png", f"{name}: {metric} by category{of_all}",
                                            categories, series))
        elif len(categories) > 1:
            key = next(k for k, v in first["by_category"][categories[0]].items() if k != "n" and isinstance(v, float))
            series = {label: [_value(entry["models"][label]["by_category"][c], key) for c in categories]
                      for label in labels}
            made[name].append(bar_chart(folder / f"{slug}.png", f"{name} by category{of_all}", categories, series,
                                        0.5 if entry["kind"] in ("pairs", "bias") else None, key))
    return made


def _format(value: Any) -> str:
    if interval := _interval(value):
        return f"{interval[0]:.3f}–{interval[1]:.3f}"
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.3f}"
    return html.escape(str(value))


def _table(rows: list[str], columns: list[str], cell: Any, header: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [header, *columns])
    body = "".join("<tr><th>" + html.escape(r) + "</th>" + "".join(f"<td>{_format(cell(r, c))}</td>" for c in columns)
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _metrics_table(entry: dict[str, Any], labels: list[str], part: str = "overall") -> str:
    keys = list(dict.fromkeys(k for label in labels for k, v in entry["models"][label][part].items()
                              if not isinstance(v, (dict, list)) or _interval(v)))
    columns = labels + (["change"] if len(labels) == 2 else [])

    def cell(key: str, column: str) -> Any:
        if column == "change":
            a, b = (_value(entry["models"][label][part], key) for label in labels)
            return None if a is None or b is None else b - a
        return entry["models"][column][part].get(key)

    return _table(keys, columns, cell)


def _category_table(entry: dict[str, Any], labels: list[str]) -> str:
    categories = list(entry["models"][labels[0]].get("by_category", {}))
    if len(categories) < 2:
        return ""
    keys = [k for k, v in entry["models"][labels[0]]["by_category"][categories[0]].items() if not isinstance(v, (dict, list))]
    columns = [f"{label}: {k}" for label in labels for k in keys]

    def cell(category: str, column: str) -> Any:
        label, key = column.rsplit(": ", 1)
        return entry["models"][label]["by_category"].get(category, {}).get(key)

    return "<details><summary>by category</summary>" + _table(categories, columns, cell, "category") + "</details>"


def _examples(entry: dict[str, Any], labels: list[str]) -> str:
    parts = []
    for label in labels:
        for example in entry["models"][label].get("examples", []):
            parts.append(f"<tr><td>{html.escape(label)}</td><td>{html.escape(example['category'])}</td>"
                         f"<td>{html.escape(example['prompt'][:300])}</td><td>{html.escape(example['response'][:400])}</td></tr>")
    if not parts:
        return ""
    return ("<details><summary>example responses</summary><table><tr><th>model</th><th>category</th><th>prompt</th>"
            "<th>response</th></tr>" + "".join(parts) + "</table></details>")


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}
th:first-child{text-align:left}img{max-width:100%;display:block;margin:.5em 0}h2{border-bottom:2px solid #4C72B0}
.skipped{color:#a33}.meta{color:#555;font-size:13px}details{margin:.3em 0 1em}"""


def render_html(report: dict[str, Any], made: dict[str, list[Path]]) -> str:
    labels = [m["label"] for m in report["models"]]
    title = f"Keel {report['kind']} evaluation: " + " vs ".join(labels)
    out = [(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>")]
    out.append(_table(labels, ["path", "fingerprint"], lambda label, c: next(m[c] for m in report["models"]
                                                                             if m["label"] == label), "model"))
    settings = {k: v for k, v in report.items() if k not in ("models", "sets", "kind")}
    out.append("<p class='meta'>" + "; ".join(f"{html.escape(k)}: {html.escape(str(v))}" for k, v in settings.items())
               + "</p>")
    out += [_image(p) for p in made["_overview"]]
    for name, entry in report["sets"].items():
        out.append(f"<h2 id='{html.escape(name)}'>{html.escape(name)}</h2>")
        about = entry.get("about") or KIND_TITLES.get(entry["kind"], "")
        if entry.get("skipped"):
            out.append(f"<p class='skipped'>skipped: {html.escape(entry['skipped'])}</p>")
            continue
        out.append(f"<p class='meta'>{html.escape(about)} — {entry['items']} items, {entry['seconds']} s"
                   + (f"; judged by the <b>{html.escape(entry['models'][labels[0]]['head'])}</b> head"
                      if "head" in entry["models"][labels[0]] else "") + "</p>")
        out.append(_metrics_table(entry, labels))
        out += [_image(p) for p in made.get(name, [])]
        out.append(_category_table(entry, labels))
        out.append(_examples(entry, labels))
    out.append("</body></html>")
    return "\n".join(out)


def write_report(report: dict[str, Any], folder: Path) -> Path:
    """Charts, report.json and report.html into folder; returns the HTML's path. Each file is written whole
    (temp file, then rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    made = charts(report, folder)
    write_json_atomic(folder / "report.json", report)
    page = folder / "report.html"
    staging = folder / ".report.html.tmp"
    staging.write_text(render_html(report, made), encoding="utf-8")
    staging.replace(page)
    return page
