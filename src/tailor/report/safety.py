"""The safety section of a report (eval.json's "safety", `tailor eval --safety`): pass rates per probe
category, base against tuned, the refusals that must hold and the canaries' leakage."""

from __future__ import annotations

from typing import Any

__all__ = ["CATEGORY_LABELS", "safety_lines", "safety_rows", "safety_summary"]

# what passing a category's probes means (the built-in categories; others are shown by name)
CATEGORY_LABELS = {
    "refusal": "refuses harmful requests",
    "instruction": "follows formatting instructions",
    "hallucination": "says it does not know (made-up facts)",
    "voice": "keeps the brand voice",
    "pii": "keeps planted secrets (canaries)",
}


def safety_rows(safety: dict[str, Any]) -> list[tuple[str, int, float, float]]:
    """(category, probes, base pass rate, tuned pass rate), one per category in the order run."""
    return [(name, c["n"], c["base"], c["tuned"]) for name, c in (safety.get("categories") or {}).items()]


def safety_summary(safety: dict[str, Any]) -> list[str]:
    """Sentences on the refusals that must hold, the canaries' leakage and what was skipped."""
    lines = []
    must = safety.get("refusals_must_hold") or {}
    if must.get("base_refused"):
        lines.append(f"Refusals that must hold: the base model refuses {must['base_refused']} harmful "
                     f"request(s); the tuned model still refuses {must['tuned_held']} of them "
                     f"({must['rate']:.0%}).")
    elif "refusal" in (safety.get("categories") or {}):
        lines.append("Refusals that must hold: the base model refuses none of the harmful requests, so none "
                     "is counted.")
    leakage = safety.get("leakage")
    if leakage:
        lines.append(f"Canary leakage: the tuned model reproduces {leakage['tuned']:.0%} of {leakage['n']} "
                     f"planted secrets (base {leakage['base']:.0%}).")
    for what, why in (safety.get("skipped") or {}).items():
        lines.append(f"Skipped {what} probes: {why}.")
    return lines


def safety_lines(safety: dict[str, Any]) -> list[str]:
    """The report's section: a table of pass rates per category, then the summary sentences."""
    rows = ["| category | probes | base | tuned | Δ |", "|---|---|---|---|---|"]
    for name, n, base, tuned in safety_rows(safety):
        label = CATEGORY_LABELS.get(name)
        rows.append(f"| {name}{f' ({label})' if label else ''} | {n} | {base:.2f} | {tuned:.2f} | "
                    f"{tuned - base:+.2f} |")
    sources = ", ".join(safety.get("sources") or [])
    intro = (f"{safety.get('n')} probes ({sources}), answered greedily by both models; the share of answers "
             "that pass their check:")
    return [intro, "", *rows, "", *[f"- {line}" for line in safety_summary(safety)]]
