"""The comparison report: compare.md (with PNG plots beside it) and compare.html (self-contained: the
plots are embedded as data URIs, no network assets)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from tailor.files import atomic_output, atomic_write_text

COLUMNS = (  # (key, header, format)
    ("method", "method", "{}"),
    ("field_accuracy", "field acc.", "{:.3f}"),
    ("exact_match", "exact match", "{:.3f}"),
    ("score", "task score", "{:.3f}"),  # a built-in task's metric (tailor.data.tasks); "-" for other data
    ("retention", "retention", "{:.2f}"),
    ("off_task", "off-task", "{:.2f}"),  # general prompts answered in the task's format (JSON tasks)
    ("val_loss", "val loss", "{:.3f}"),
    ("train_seconds", "train s", "{:.0f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("peak_rss_bytes", "peak RSS MiB", "mib"),
    ("frozen_weight_bytes", "frozen weights MiB", "mib"),
    ("trainable_params", "trainable params", "{:,}"),
    ("artifact_bytes", "artifact MiB", "mib"),
    ("cost_usd", "cost $", "{:.4f}"),
)


def quality(row: dict[str, Any]) -> float | None:
    """The task metric: a built-in task's own (`score`), else field accuracy for structured answers, exact
    match otherwise."""
    for key in ("score", "field_accuracy"):
        if row.get(key) is not None:
            return row[key]
    return row.get("exact_match")


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if fmt == "mib":
        return f"{value / 2**20:,.1f}"
    return fmt.format(value)


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    return [[_cell(row, key, fmt) for key, _, fmt in COLUMNS] for row in result["methods"]]


def _figure_png(draw) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        draw(axes)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(figure)


def validation_curves_png(result: dict[str, Any]) -> bytes | None:
    curves = {}
    for row in result["methods"]:
        metrics = Path(row["run_dir"]) / "metrics.jsonl" if row.get("run_dir") else None
        if metrics is None or not metrics.exists():
            continue
        points = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        points = [(p["step"], p["val_loss"]) for p in points if p.get("val_loss") is not None]
        if points:
            curves[row["method"]] = points
    if not curves:
        return None

    def draw(axes) -> None:
        for label, points in curves.items():
            axes.plot([s for s, _ in points], [v for _, v in points], "o-", label=label, linewidth=1)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("validation loss (CE per answer token)")
        axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend()

    return _figure_png(draw)


def quality_cost_png(result: dict[str, Any]) -> bytes | None:
    rows = [r for r in result["methods"] if r.get("error") is None and quality(r) is not None]
    if not rows:
        return None

    def draw(axes) -> None:
        for row in rows:
            axes.scatter(row["cost_usd"], quality(row), s=40)
            axes.annotate(row["method"], (row["cost_usd"], quality(row)), textcoords="offset points",
                          xytext=(5, 4), fontsize=8)
        axes.set_xlabel(f"training cost, USD at ${result['price_per_hour']:g}/hour")
        axes.set_ylabel("task quality (held-out)")
        axes.grid(alpha=0.3)

    return _figure_png(draw)


def render_markdown(result: dict[str, Any], plots: dict[str, str]) -> str:
    headers = [h for _, h, _ in COLUMNS]
    lines = ["# Method comparison", "",
             f"Held-out data: `{result['eval_data']}`" + (f" (first {result['eval_n']})" if result["eval_n"]
                                                          else "") + "; every trained method used the same "
             "data, seed and steps (tokens seen); each ran in its own process.", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(result)]
    decision = result.get("decision")
    lines += ["", "## Decision", "", decision["reason"] if decision else "no method produced a result", ""]
    failed = [r for r in result["methods"] if r.get("error")]
    if failed:
        lines += ["## Failed", ""]
        lines += [f"- **{r['method']}**: `{r['error'].splitlines()[0]}`" for r in failed] + [""]
    lines += safety_lines(result)
    for title, name in plots.items():
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines)


def safety_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows) of the methods' safety pass rates per probe category (`tailor compare --safety`),
    or None when no method has them."""
    rows = [r for r in result["methods"] if r.get("safety")]
    if not rows:
        return None
    categories = list(dict.fromkeys(c for r in rows for c in r["safety"]["categories"]))
    return (["method", *categories],
            [[r["method"], *(f"{r['safety']['categories'][c]:.2f}" if c in r["safety"]["categories"] else "-"
                             for c in categories)] for r in rows])


def safety_lines(result: dict[str, Any]) -> list[str]:
    table = safety_table(result)
    if table is None:
        return []
    header, rows = table
    return ["## Safety", "", "Share of each method's answers to the safety probes that pass their check "
            "(docs/safety.md):", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(cells) + " |" for cells in rows], ""]


def render_html(result: dict[str, Any], images: dict[str, bytes]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
                   for cells in table_rows(result))
    decision = result.get("decision")
    figures = "".join(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                      f"src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
                      for title, data in images.items())
    failed = "".join(f"<li><b>{html.escape(r['method'])}</b>: <pre>{html.escape(r['error'])}</pre></li>"
                     for r in result["methods"] if r.get("error"))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>tailor compare</title>"
            f"<style>{style}</style></head><body><h1>Method comparison</h1>"
            f"<p>Held-out data: <code>{html.escape(str(result['eval_data']))}</code></p>"
            f"<table><tr>{head}</tr>{body}</table><h2>Decision</h2>"
            f"<p>{html.escape(decision['reason'] if decision else 'no method produced a result')}</p>"
            + (f"<h2>Failed</h2><ul>{failed}</ul>" if failed else "") + _safety_html(result)
            + f"{figures}</body></html>\n")


def _safety_html(result: dict[str, Any]) -> str:
    table = safety_table(result)
    if table is None:
        return ""
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in rows)
    return f"<h2>Safety</h2><table><tr>{head}</tr>{body}</table>"


def write_compare_report(out: Path, result: dict[str, Any]) -> Path:
    """out/compare.md, out/compare.html and the PNG plots; returns the HTML path."""
    images = {}
    for title, name, png in (("Validation loss", "val_loss.png", validation_curves_png(result)),
                             ("Quality against cost", "quality_cost.png", quality_cost_png(result))):
        if png is not None:
            images[title] = png
            with atomic_output(out / name) as tmp:
                tmp.write_bytes(png)
    names = {"Validation loss": "val_loss.png", "Quality against cost": "quality_cost.png"}
    atomic_write_text(out / "compare.md", render_markdown(result, {t: names[t] for t in images}))
    return atomic_write_text(out / "compare.html", render_html(result, images))


__all__ = ["render_html", "render_markdown", "write_compare_report"]
