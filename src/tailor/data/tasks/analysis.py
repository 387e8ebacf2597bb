"""The analysis task: a small CSV table (3-5 rows: a name, a category, one number) and a question -> an
exact number, a name, or a small JSON value. Scored by exact match after normalising formatting (1,200 =
1200.0 = 1200; names ignore case and quotes; JSON compared as values).

    Table:
    name,team,tickets
    Ava,north,30
    ...
    Question: Which name has the highest tickets?      ->  Ava

Question kinds are those the default model (135M) learns within the demo's few hundred steps: reading
(a lookup), comparing (highest, lowest, which row, both as JSON) and counting a category. Sums, counts
above a threshold and filtered lists were generated at first and scored 0.00 after 250 steps (the whole
task 0.26): arithmetic over a table is beyond a model this size at this budget.
"""

from __future__ import annotations

import json
import random
from typing import Any

from tailor.data.example import Example
from tailor.data.splits import SPLIT_SIZES, build_split
from tailor.data.tasks import BuiltinTask

SYSTEM_PROMPT = ("Answer the question about the table. Give only the answer: a number, a name, or the JSON "
                 "asked for.")

# (label column, its values, category column, its values, numeric columns: a table has one of them)
SCHEMAS = (
    ("name", ("Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jun"), "team",
     ("north", "south", "east"), ("hours", "tickets")),
    ("store", ("Oakridge", "Riverside", "Hilltop", "Lakeview", "Downtown", "Harbor", "Midtown", "Westfield"),
     "region", ("coast", "inland"), ("sales", "visits")),
    ("product", ("lamp", "kettle", "mug", "chair", "desk", "fan", "rug", "clock", "vase"), "category",
     ("home", "office", "kitchen"), ("price", "stock")),
    ("city", ("Avon", "Bree", "Carn", "Dale", "Esk", "Fenn", "Gort", "Holt"), "country", ("UK", "IE"),
     ("rainfall", "visitors")),
)
QUESTION_KINDS = ("max", "min", "argmax", "argmin", "lookup", "count_category", "range_json")


def _table(rng: random.Random) -> tuple[tuple, list[dict[str, Any]]]:
    schema = rng.choice(SCHEMAS)
    label, labels, category, categories, numeric = schema
    column = rng.choice(numeric)
    names = rng.sample(labels, rng.randint(3, 5))
    values = rng.sample(range(1, 100), len(names))  # distinct: no ties
    rows = [{label: name, category: rng.choice(categories), column: value}
            for name, value in zip(names, values, strict=True)]
    return (label, labels, category, categories, column), rows


def _question(rng: random.Random, schema: tuple, rows: list[dict[str, Any]]) -> tuple[str, str]:
    label, _, category, categories, column = schema
    values = [row[column] for row in rows]
    kind = rng.choice(QUESTION_KINDS)
    if kind == "max":
        return f"What is the highest {column}?", str(max(values))
    if kind == "min":
        return f"What is the lowest {column}?", str(min(values))
    if kind in ("argmax", "argmin"):
        pick = max if kind == "argmax" else min
        best = pick(rows, key=lambda row: row[column])
        return f"Which {label} has the {'highest' if kind == 'argmax' else 'lowest'} {column}?", best[label]
    if kind == "lookup":
        row = rng.choice(rows)
        return f"What is the {column} of {row[label]}?", str(row[column])
    if kind == "count_category":
        value = rng.choice(categories)
        return f"How many rows have {category} {value}?", str(sum(row[category] == value for row in rows))
    return (f'Give the highest and lowest {column} as JSON {{"max": ..., "min": ...}}.',
            json.dumps({"max": max(values), "min": min(values)}))


def _one(rng: random.Random) -> tuple[str, str]:
    schema, rows = _table(rng)
    header = list(rows[0])
    csv = "\n".join([",".join(header)] + [",".join(str(row[c]) for c in header) for row in rows])
    question, answer = _question(rng, schema, rows)
    return f"Table:\n{csv}\n\nQuestion: {question}", answer


def build(split: str, n: int | None = None) -> list[Example]:
    """The first n examples (default 4000 / 200 / 200) of a split, [system, user: table and question,
    assistant: the answer]; deterministic, splits disjoint."""
    return build_split("analysis", SYSTEM_PROMPT, _one, split, n)


_DECODER = json.JSONDecoder()


def _number(text: str) -> float | None:
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "").strip()
    try:
        return float(cleaned)
    except ValueError:
        return None


def _json_value(text: str) -> Any:
    """The first JSON list or object in `text`, or None."""
    for start, char in enumerate(text):
        if char in "[{":
            try:
                return _DECODER.raw_decode(text, start)[0]
            except json.JSONDecodeError:
                continue
    return None


def _normal(value: Any) -> Any:
    """Numbers as floats (1200 == 1200.0), strings lowered, containers element-wise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        number = _number(value)
        return number if number is not None else value.strip().strip("\"'").lower()
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {str(k).lower(): _normal(v) for k, v in value.items()}
    return value


def same_answer(prediction: str, reference: str) -> bool:
    """Whether a prediction matches a reference answer after normalising formatting: numbers by value
    ("1,200" = "1200.0" = "1200"), names ignoring case, surrounding quotes and a final period, JSON by
    value."""
    if reference.lstrip()[:1] in "[{":
        return _normal(_json_value(prediction)) == _normal(json.loads(reference))
    number = _number(reference)
    if number is not None:
        predicted = _number(prediction)
        return predicted is not None and abs(predicted - number) < 1e-9
    return _normal(prediction.strip().rstrip(".")) == _normal(reference)


def score(predictions: list[str], examples: list[Example]) -> dict[str, Any]:
    """{"score": normalised_exact_match (`same_answer`), "normalised_exact_match", "n", "per_kind":
    {question kind: accuracy}}."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions but {len(examples)} examples; need one each.")
    hits: dict[str, list[bool]] = {}
    for prediction, example in zip(predictions, examples, strict=True):
        question = example.prompt[-1]["content"].rsplit("Question: ", 1)[-1]
        hits.setdefault(_kind_of(question), []).append(same_answer(prediction, example.reference or ""))
    n = sum(len(v) for v in hits.values())
    rate = sum(sum(v) for v in hits.values()) / n if n else 0.0
    return {"score": rate, "normalised_exact_match": rate, "n": n,
            "per_kind": {kind: sum(v) / len(v) for kind, v in sorted(hits.items())}}


_KIND_CUES = (("range_json", "highest and lowest"), ("filter", "JSON list"), ("argmax", "has the highest"),
              ("argmin", "has the lowest"), ("max", "the highest"), ("min", "the lowest"),
              ("sum", "the total"), ("lookup", "What is the"), ("count", "How many"))


def _kind_of(question: str) -> str:
    """Which kind of question this is (first cue found), for the per-kind accuracies."""
    return next((kind for kind, cue in _KIND_CUES if cue in question), "other")


TASK = BuiltinTask(
    name="analysis", kind="analysis", metric="normalised_exact_match",
    description="Answer a question about a small CSV table (highest, lowest, which row, lookup, count, "
                "highest and lowest as JSON) with an exact number, a name or a small JSON value.",
    split_sizes=dict(SPLIT_SIZES), build=build, score=score)

__all__ = ["QUESTION_KINDS", "SYSTEM_PROMPT", "TASK", "build", "same_answer", "score"]
