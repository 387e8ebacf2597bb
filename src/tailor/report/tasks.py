"""The methods x tasks report of `tailor compare --recipe tasks`: tasks.md (one table per measure, a row
per method, a column per task, and the decision per task)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tailor.files import atomic_write_text
from tailor.report.compare import quality

# (what a cell shows, its header, its format)
MEASURES = (("quality", "Quality (the task's own metric, held-out)", "{:.3f}"),
            ("retention", "Retention (general prompts answered as the base answers them)", "{:.2f}"),
            ("train_seconds", "Training time (s)", "{:.0f}"),
            ("cost_usd", "Training cost (USD)", "{:.4f}"))


def _value(row: dict[str, Any] | None, measure: str) -> Any:
    if row is None or row.get("error"):
        return None
    return quality(row) if measure == "quality" else row.get(measure)


def tasks_table(result: dict[str, Any], measure: str) -> list[list[str]]:
    """[header, one row per method]: `measure` of each method on each task ("-" where it has none,
    "error" where the method failed on that task)."""
    tasks = list(result["tasks"])
    fmt = dict((key, f) for key, _, f in MEASURES)[measure]
    rows = [["method", *(f"{name} ({result['tasks'][name]['metric']})" if measure == "quality" else name
                         for name in tasks)]]
    for method in result["methods"]:
        cells = [method]
        for name in tasks:
            row = next((r for r in result["tasks"][name]["methods"] if r.get("method") == method), None)
            value = _value(row, measure)
            cells.append("error" if row is not None and row.get("error") else
                         "-" if value is None else fmt.format(value))
        rows.append(cells)
    return rows


def render_tasks_markdown(result: dict[str, Any]) -> str:
    first = f" (first {result['eval_n']} examples)" if result.get("eval_n") else ""
    lines = ["# Methods x tasks", "",
             "Every method trained with the same recipe on each built-in task (`data: builtin:TASK`) and was "
             f"scored on its test split{first}; {result['wall_seconds'] / 60:.1f} minutes in all. "
             "Each task's full comparison is in its folder (TASK/compare.md).", ""]
    for measure, title, _ in MEASURES:
        header, *rows = tasks_table(result, measure)
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows] + [""]
    lines += ["## Decision per task", "",
              f"The cheapest method within {result['margin']:g} of the best quality on that task.", ""]
    for name, task in result["tasks"].items():
        decision = task["decision"]
        lines.append(f"- **{name}**: " + (decision["reason"] if decision else "no method produced a result"))
    return "\n".join(lines) + "\n"


def write_tasks_report(out: Path, result: dict[str, Any]) -> Path:
    """out/tasks.md."""
    return atomic_write_text(Path(out) / "tasks.md", render_tasks_markdown(result))


__all__ = ["MEASURES", "render_tasks_markdown", "tasks_table", "write_tasks_report"]
