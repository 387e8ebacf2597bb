"""Scores for answers that are JSON objects: validity, exact match, per-field accuracy. Here, with the
built-in tasks, so that a task's metric (the support task's field accuracy) and tailor.eval share one copy."""

from __future__ import annotations

import json
from typing import Any

_DECODER = json.JSONDecoder()


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in `text`, or None.

    Models wrap answers in prose or code fences ("Sure! ```json {...} ```"), so this scans for each
    `{` and returns the first position where a complete object decodes; trailing text is ignored.
    """
    start = text.find("{")
    while start != -1:
        try:
            value, _ = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def score_structured(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """Compare predicted JSON answers with reference JSON objects.

    Returns
      json_valid:     fraction of predictions holding a JSON object (see `parse_json_object`),
      exact_match:    fraction whose parsed object equals the reference object (same keys and values),
      field_accuracy: fraction of (example, reference field) pairs where the prediction has the field with
                      an equal value (a missing field or an unparsable prediction counts as wrong; values
                      compare exactly, as JSON values: "12" != 12, case matters),
      per_field:      {field: accuracy over the examples whose reference has that field},
      n:              number of examples.
    Extra predicted fields cost exact_match but not field_accuracy.

    Raises:
        ValueError: lengths differ, or a reference is not a JSON object (a bug in the data, not the model).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; need one each.")
    bad = [i for i, ref in enumerate(references) if not isinstance(loads_or_none(ref), dict)]
    if bad:
        raise ValueError(
            f"references {bad[:5]}{'...' if len(bad) > 5 else ''} are not JSON objects "
            f"(first: {references[bad[0]]!r:.80}); score_structured needs a JSON object per reference."
        )
    n = len(references)
    valid = exact = 0
    hits: dict[str, int] = {}
    counts: dict[str, int] = {}
    for prediction, reference_text in zip(predictions, references, strict=True):
        reference = json.loads(reference_text)
        parsed = parse_json_object(prediction)
        valid += parsed is not None
        exact += parsed == reference
        for field, expected in reference.items():
            counts[field] = counts.get(field, 0) + 1
            ok = parsed is not None and field in parsed and _same(parsed[field], expected)
            hits[field] = hits.get(field, 0) + ok
    pairs = sum(counts.values())
    return {
        "n": n,
        "json_valid": valid / n if n else 0.0,
        "exact_match": exact / n if n else 0.0,
        "field_accuracy": sum(hits.values()) / pairs if pairs else 0.0,
        "per_field": {field: hits[field] / counts[field] for field in counts},
    }


def _same(value: Any, expected: Any) -> bool:
    # bool is an int in Python (True == 1); JSON keeps them apart, and so do we.
    return value == expected and isinstance(value, bool) == isinstance(expected, bool)


def loads_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return None


__all__ = ["loads_or_none", "parse_json_object", "score_structured"]
