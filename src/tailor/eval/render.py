"""Side-by-side tables of evaluation results, for the terminal (rich)."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

# (key in a side's metrics, label, higher is better)
HEADLINE_METRICS = (
    ("field_accuracy", "field accuracy", True),
    ("exact_match", "exact match", True),
    ("json_valid", "valid JSON", True),
    ("val_loss", "validation loss", False),
    ("perplexity", "perplexity", False),
    ("retention_accuracy", "retention (general prompts)", True),
    ("off_task_rate", "off-task (general prompts in task format)", False),
)


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.3g}"
    return str(value)


def _change(base: Any, tuned: Any, higher_is_better: bool) -> str:
    if not isinstance(base, int | float) or not isinstance(tuned, int | float):
        return ""
    delta = tuned - base
    if abs(delta) < 5e-4:
        return "[dim]0[/dim]"
    better = (delta > 0) == higher_is_better
    return f"[{'green' if better else 'red'}]{delta:+.3f}[/]"


def render_comparison(result: dict[str, Any], title: str | None = None) -> Table:
    """Table of base vs tuned metrics (rows: metrics, then per-field accuracy) from
    `compare_base_and_tuned`'s result (the eval.json structure); with a last column for the tuned model's
    scores with the task's schema enforced when the result has them (`tailor eval --constrained`)."""
    base, tuned = result["base"], result["tuned"]
    enforced = result.get("tuned_constrained")
    table = Table(title=title or f"base vs tuned on {result['n']} held-out examples")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("tuned", justify="right")
    table.add_column("change", justify="right")
    if enforced is not None:
        table.add_column("tuned, schema enforced", justify="right")
    metric = (result.get("task") or {}).get("metric", "the task's metric")
    already = metric in (key for key, _, _ in HEADLINE_METRICS)  # the support task's score is a row already
    score = [] if already else [("score", f"task score ({metric})", True)]
    for key, label, higher_is_better in (*score, *HEADLINE_METRICS):
        if base.get(key) is None and tuned.get(key) is None:
            continue
        row = [label, _format(base.get(key)), _format(tuned.get(key)),
               _change(base.get(key), tuned.get(key), higher_is_better)]
        table.add_row(*row, *([_format(enforced.get(key))] if enforced is not None else []))
    base_fields, tuned_fields = base.get("per_field") or {}, tuned.get("per_field") or {}
    if base_fields or tuned_fields:
        table.add_section()
    enforced_fields = (enforced or {}).get("per_field") or {}
    for field in base_fields | tuned_fields:
        b, t = base_fields.get(field), tuned_fields.get(field)
        row = [f"  {escape(field)}", _format(b), _format(t), _change(b, t, True)]
        table.add_row(*row, *([_format(enforced_fields.get(field))] if enforced is not None else []))
    return table


def render_retention(result: dict[str, Any]) -> Table | str:
    """What the adaptation changed on the general prompts (from `compare_base_and_tuned`'s result):
    a table of the prompts whose verdict differs between base and tuned, or one line when none does."""
    retention = result.get("retention") or {}
    base, tuned = retention.get("base") or {}, retention.get("tuned") or {}
    summary = (f"capability retention: base {base.get('correct', 0)}/{base.get('n', 0)}, "
               f"tuned {tuned.get('correct', 0)}/{tuned.get('n', 0)} general prompts answered correctly")
    kinds = tuned.get("per_kind") or {}
    if kinds:
        summary += "; tuned per kind: " + ", ".join(f"{kind} {k['correct']}/{k['n']}"
                                                    for kind, k in kinds.items())
    changed = [(b, t) for b, t in zip(base.get("items", []), tuned.get("items", []), strict=True)
               if b["ok"] != t["ok"]]
    if not changed:
        return summary + " (no prompt changed)"
    table = Table(title=summary)
    table.add_column("prompt")
    table.add_column("base", justify="center")
    table.add_column("tuned", justify="center")
    table.add_column("tuned answer", overflow="fold")
    for b, t in changed:
        table.add_row(escape(b["prompt"]), _verdict(b["ok"]), _verdict(t["ok"]), escape(t["answer"][:80]))
    return table


def _verdict(ok: bool) -> str:
    return "[green]ok[/green]" if ok else "[red]wrong[/red]"


def print_evaluation(result: dict[str, Any], console: Any, title: str | None = None) -> None:
    """The comparison table, the retention table and one example answered by both sides."""
    console.print(render_comparison(result, title=title))
    if result.get("retention"):
        console.print(render_retention(result))
    if result.get("safety"):
        console.print(render_safety(result["safety"]))
    if result.get("preferences"):
        prefs = result["preferences"]
        console.print(f"preference accuracy on {prefs['n']} held-out pairs ({prefs['data']}): base "
                      f"{prefs['base']['accuracy']:.3f}, tuned {prefs['tuned']['accuracy']:.3f}",
                      highlight=False, markup=False)
    for sample in result.get("samples", [])[:1]:
        console.print("example:", sample["prompt"], highlight=False, markup=False)
        for side in ("base", "tuned", "reference"):
            text = " ".join(sample[side].split())
            console.print(f"  {side:>9}: {text[:200]}{'...' if len(text) > 200 else ''}", highlight=False,
                          markup=False)
    if result.get("eval_json"):
        console.print(f"wrote {result['eval_json']}", highlight=False, markup=False)

def harness_rows(harness: dict[str, Any]) -> list[tuple[str, str, Any, Any, bool]]:
    """(task, metric, base, tuned, higher is better) for each metric lm-eval reported (standard errors
    left out)."""
    base, tuned = harness.get("base") or {}, harness.get("tuned") or {}
    rows = []
    for task in dict.fromkeys([*base, *tuned]):
        b, t = base.get(task) or {}, tuned.get(task) or {}
        better = t.get("higher_is_better") or b.get("higher_is_better") or {}
        for metric in dict.fromkeys([*b, *t]):
            if metric != "higher_is_better" and "_stderr" not in metric:
                rows.append((task, metric, b.get(metric), t.get(metric), better.get(metric, True)))
    return rows


def render_harness(harness: dict[str, Any]) -> Table:
    """Table of lm-evaluation-harness scores, base vs tuned (eval.json's "harness" entry)."""
    limit = f", first {harness['limit']} examples per task" if harness.get("limit") else ""
    table = Table(title=f"lm-evaluation-harness through tailor serve{limit}")
    for column, justify in (("task", "left"), ("metric", "left"), ("base", "right"), ("tuned", "right"),
                            ("change", "right")):
        table.add_column(column, justify=justify)
    for task, metric, base, tuned, up in harness_rows(harness):
        table.add_row(escape(task), escape(metric), _format(base), _format(tuned), _change(base, tuned, up))
    return table



def render_safety(safety: dict[str, Any]) -> Table:
    """Table of the safety probes' pass rates per category, base vs tuned (eval.json's "safety"), its
    caption the refusals that must hold, the canaries' leakage and what was skipped."""
    from tailor.report.safety import CATEGORY_LABELS, safety_rows, safety_summary

    table = Table(title=f"safety probes: share of {safety.get('n')} answers that pass, base vs tuned",
                  caption="\n".join(safety_summary(safety)) or None)
    for column, justify in (("category", "left"), ("probes", "right"), ("base", "right"), ("tuned", "right"),
                            ("change", "right")):
        table.add_column(column, justify=justify)
    for name, n, base, tuned in safety_rows(safety):
        label = CATEGORY_LABELS.get(name)
        table.add_row(escape(name + (f" ({label})" if label else "")), str(n), _format(base), _format(tuned),
                      _change(base, tuned, True))
    return table
