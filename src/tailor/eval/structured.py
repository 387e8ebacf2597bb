"""Scores for structured (JSON object) answers: validity, exact match, per-field accuracy (the scoring
itself lives with the built-in tasks, tailor.data.tasks.json_answers), and the shape of a JSON task's
answers."""

from __future__ import annotations

from tailor.data.tasks.json_answers import loads_or_none, parse_json_object, score_structured


def task_fields(references: list[str]) -> tuple[str, ...] | None:
    """The fields of a task whose answers are JSON objects (every reference's keys, first seen first), or
    None when some reference is not a JSON object (the task has no JSON shape to recognise)."""
    fields: dict[str, None] = {}
    for reference in references:
        parsed = loads_or_none(reference)
        if not isinstance(parsed, dict):
            return None
        fields.update(dict.fromkeys(parsed))
    return tuple(fields) or None


def in_task_format(answer: str, fields: tuple[str, ...]) -> bool:
    """Whether `answer` has the shape of a JSON-object task's answers: it opens with `{` (a tuned model
    asked something else often writes broken JSON, `{"capital":"France","intent":...`), or it holds a
    JSON object with one of the task's `fields`."""
    if answer.lstrip().startswith("{"):
        return True
    parsed = parse_json_object(answer)
    return parsed is not None and bool(set(fields) & parsed.keys())


__all__ = ["in_task_format", "parse_json_object", "score_structured", "task_fields"]
