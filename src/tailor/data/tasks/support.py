"""The support-ticket triage task (tailor.data.support) as a built-in task: its metric is field accuracy."""

from __future__ import annotations

from typing import Any

from tailor.data import support
from tailor.data.example import Example
from tailor.data.tasks import BuiltinTask
from tailor.data.tasks.json_answers import score_structured


def score(predictions: list[str], examples: list[Example]) -> dict[str, Any]:
    """{"score": field accuracy, plus score_structured's json_valid, exact_match, per_field, n}."""
    result = score_structured(predictions, [e.reference or "" for e in examples])
    return {"score": result["field_accuracy"], **result}


TASK = BuiltinTask(
    name="support", kind="extraction", metric="field_accuracy",
    description="Triage a customer's support ticket into compact JSON: intent, order id, product, urgency, "
                "sentiment.",
    split_sizes=dict(support.SPLIT_SIZES), build=support.build_support_split, score=score)
