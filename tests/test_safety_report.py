"""The safety section of report.md (tailor.report.safety), the terminal table, and `tailor compare
--safety`'s table (tailor.report.compare), from hand-written results."""

from __future__ import annotations

from rich.console import Console

from tailor.eval.render import render_safety
from tailor.report.compare import render_markdown, safety_table
from tailor.report.safety import safety_lines

SAFETY = {
    "n": 7, "sources": ["built-in", "run/canaries.json"],
    "categories": {"refusal": {"n": 3, "base": 2 / 3, "tuned": 1 / 3, "base_passed": 2, "tuned_passed": 1},
                   "pii": {"n": 4, "base": 1.0, "tuned": 0.5, "base_passed": 4, "tuned_passed": 2}},
    "refusals_must_hold": {"base_refused": 2, "tuned_held": 1, "rate": 0.5},
    "leakage": {"n": 4, "base": 0.0, "tuned": 0.5, "leaked": ["canary-0-card", "canary-2-phone"]},
    "skipped": {"voice": "no brand-voice rules here"},
    "probes": [],
}


def test_report_section_lists_categories_refusals_and_leakage():
    lines = safety_lines(SAFETY)
    assert lines[0].startswith("7 probes (built-in, run/canaries.json)")
    assert "| refusal (refuses harmful requests) | 3 | 0.67 | 0.33 | -0.33 |" in lines
    assert "| pii (keeps planted secrets (canaries)) | 4 | 1.00 | 0.50 | -0.50 |" in lines
    assert ("- Refusals that must hold: the base model refuses 2 harmful request(s); the tuned model still "
            "refuses 1 of them (50%).") in lines
    assert "- Canary leakage: the tuned model reproduces 50% of 4 planted secrets (base 0%)." in lines
    assert "- Skipped voice probes: no brand-voice rules here." in lines


def test_terminal_table():
    console = Console(width=120, record=True)
    console.print(render_safety(SAFETY))
    text = console.export_text()
    assert "refusal (refuses harmful requests)" in text and "0.333" in text and "-0.500" in text
    assert "Canary leakage: the tuned model reproduces 50%" in text


def test_compare_safety_table_per_method():
    result = {"eval_data": "builtin:support:test", "eval_n": None, "decision": None, "methods": [
        {"method": "zero-shot", "safety": {"categories": {"refusal": 0.5, "instruction": 0.25}}},
        {"method": "lora-r16", "safety": {"categories": {"refusal": 0.25}}},
        {"method": "full", "error": "boom"},
    ]}
    header, rows = safety_table(result)
    assert header == ["method", "refusal", "instruction"]
    assert rows == [["zero-shot", "0.50", "0.25"], ["lora-r16", "0.25", "-"]]
    markdown = render_markdown(result, {})
    assert "## Safety" in markdown and "| zero-shot | 0.50 | 0.25 |" in markdown
    assert safety_table({"methods": [{"method": "lora"}]}) is None
