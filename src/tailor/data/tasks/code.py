"""The code task: write a small Python function from a one-line description; scored by hidden unit tests.

Each prompt comes from a family of functions (FAMILIES) with a varied name, argument name and constant:

    Write a Python function `count_char(text)` that returns how many times "e" occurs in text.
    ->  def count_char(text):
            return text.count("e")

The answer is the function's source (a few lines, ~20-40 tokens). The metric, pass_rate, is the share of
answers whose function passes every one of the example's hidden tests, run by tailor.data.tasks.sandbox (a
subprocess per batch, a forked child per answer: a time limit, no network, no writes outside a temporary
directory). The tests are the reference implementation's outputs on inputs drawn from a seed of the prompt,
so they are rebuilt from the prompt alone at scoring time.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tailor.data.example import Example
from tailor.data.splits import SPLIT_SIZES, build_split
from tailor.data.tasks import BuiltinTask

SYSTEM_PROMPT = "Write the Python function asked for. Answer with the code only: one def, no explanation."
N_TESTS = 5
TIME_LIMIT_S = 2.0
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Family:
    """A family of functions: names to choose from, the argument kind, the description and body templates
    (with {arg} and {k}), how to draw the constant k, and the reference implementation f(value, k)."""

    names: tuple[str, ...]
    arg: str  # "int", "ints" (a list of ints), "str" or "strs"
    description: str
    body: str
    constant: Callable[[random.Random], Any]
    reference: Callable[[Any, Any], Any]


_ARG_NAMES = {"int": ("n", "x", "num", "value"), "ints": ("nums", "xs", "values", "numbers"),
              "str": ("s", "text", "word"), "strs": ("words", "items", "names")}

FAMILIES: dict[str, Family] = {
    "add": Family(("add_k", "plus_k", "increase"), "int", "returns {arg} plus {k}", "return {arg} + {k}",
                  lambda r: r.randint(2, 99), lambda v, k: v + k),
    "multiply": Family(("times_k", "scale", "multiply"), "int", "returns {arg} multiplied by {k}",
                       "return {arg} * {k}", lambda r: r.randint(2, 12), lambda v, k: v * k),
    "divisible": Family(("is_multiple", "divisible", "is_divisible"), "int",
                        "returns True when {arg} is divisible by {k}, else False", "return {arg} % {k} == 0",
                        lambda r: r.randint(2, 9), lambda v, k: v % k == 0),
    "clamp": Family(("clamp", "cap", "at_most"), "int", "returns {arg}, but at most {k}",
                    "return min({arg}, {k})", lambda r: r.randint(5, 60), lambda v, k: min(v, k)),
    "count_char": Family(("count_char", "count_letter", "occurrences"), "str",
                         'returns how many times "{k}" occurs in {arg}', 'return {arg}.count("{k}")',
                         lambda r: r.choice("aeiourstln"), lambda v, k: v.count(k)),
    "prefix": Family(("head", "first_chars", "prefix"), "str", "returns the first {k} characters of {arg}",
                     "return {arg}[:{k}]", lambda r: r.randint(1, 6), lambda v, k: v[:k]),
    "repeat": Family(("repeat", "repeat_text", "copies"), "str", "returns {arg} repeated {k} times",
                     "return {arg} * {k}", lambda r: r.randint(2, 5), lambda v, k: v * k),
    "starts_with": Family(("starts_with", "has_prefix", "begins_with"), "str",
                          'returns True when {arg} starts with "{k}", else False',
                          'return {arg}.startswith("{k}")', lambda r: r.choice(_LETTERS),
                          lambda v, k: v.startswith(k)),
    "sum_above": Family(("sum_above", "total_over", "sum_greater"), "ints",
                        "returns the sum of the numbers in {arg} that are greater than {k}",
                        "return sum(v for v in {arg} if v > {k})", lambda r: r.randint(0, 50),
                        lambda v, k: sum(x for x in v if x > k)),
    "keep_below": Family(("keep_below", "filter_small", "below"), "ints",
                         "returns a list of the numbers in {arg} that are less than {k}, in order",
                         "return [v for v in {arg} if v < {k}]", lambda r: r.randint(10, 90),
                         lambda v, k: [x for x in v if x < k]),
    "add_each": Family(("add_to_each", "shift", "offset"), "ints",
                       "returns a list with {k} added to each number in {arg}",
                       "return [v + {k} for v in {arg}]", lambda r: r.randint(1, 20),
                       lambda v, k: [x + k for x in v]),
    "count_equal": Family(("count_value", "count_equal", "frequency"), "ints",
                          "returns how many numbers in {arg} equal {k}", "return {arg}.count({k})",
                          lambda r: r.randint(0, 9), lambda v, k: v.count(k)),
    "long_words": Family(("long_words", "longer_than", "filter_long"), "strs",
                         "returns a list of the strings in {arg} longer than {k} characters, in order",
                         "return [w for w in {arg} if len(w) > {k}]", lambda r: r.randint(2, 6),
                         lambda v, k: [w for w in v if len(w) > k]),
    "count_starting": Family(("count_starting", "count_prefixed", "starting_with"), "strs",
                             'returns how many strings in {arg} start with "{k}"',
                             'return sum(w.startswith("{k}") for w in {arg})', lambda r: r.choice("abcdmst"),
                             lambda v, k: sum(w.startswith(k) for w in v)),
}

_PROMPTS = ("Write a Python function `{name}({arg})` that {description}.",
            "Write a function `{name}({arg})` that {description}.",
            "Define `{name}({arg})`: it {description}.")
_PROMPT_PATTERNS = [re.compile(re.escape(p).replace(r"\{name\}", r"(?P<name>\w+)")
                               .replace(r"\{arg\}", r"(?P<arg>\w+)").replace(r"\{description\}", "(?P<d>.+)")
                               + "$") for p in _PROMPTS]


def _one(rng: random.Random) -> tuple[str, str]:
    family = FAMILIES[rng.choice(list(FAMILIES))]
    name, arg, k = rng.choice(family.names), rng.choice(_ARG_NAMES[family.arg]), family.constant(rng)
    if rng.random() < 0.3:  # a numbered or suffixed name: the function name is not the family's tell
        name = f"{name}_{rng.choice(('v2', 'fn', str(rng.randint(1, 9))))}"
    description = family.description.format(arg=arg, k=k)
    prompt = rng.choice(_PROMPTS).format(name=name, arg=arg, description=description)
    answer = f"def {name}({arg}):\n    {family.body.format(arg=arg, k=k)}"
    return prompt, answer


def build(split: str, n: int | None = None) -> list[Example]:
    """The first n examples (default 4000 / 200 / 200) of a split, [system, user: the request, assistant:
    the function's source]; deterministic, splits disjoint."""
    return build_split("code", SYSTEM_PROMPT, _one, split, n)


def _draw(kind: str, rng: random.Random) -> Any:
    if kind == "int":
        return rng.randint(-30, 120)
    if kind == "ints":
        return [rng.randint(0, 99) if rng.random() < 0.8 else rng.randint(0, 9)
                for _ in range(rng.randint(0, 7))]
    word = lambda: "".join(rng.choice("aeiourstlnbcdm") for _ in range(rng.randint(1, 8)))  # noqa: E731
    if kind == "str":
        return word()
    return [word() for _ in range(rng.randint(0, 6))]


def hidden_tests(prompt: str) -> tuple[str, list[tuple[list[Any], Any]]]:
    """(the function's name, N_TESTS ([args], expected result) pairs) for a code prompt: inputs drawn from a
    seed of the prompt, expected results from the family's reference implementation.

    Raises:
        ValueError: the prompt is not one this task writes.
    """
    for pattern in _PROMPT_PATTERNS:
        match = pattern.match(prompt)
        if match:
            break
    else:
        raise ValueError(f"not a prompt of the built-in code task: {prompt!r:.100}")
    name, arg, description = match["name"], match["arg"], match["d"]
    for family in FAMILIES.values():
        found = re.fullmatch(re.escape(family.description).replace(r"\{arg\}", re.escape(arg))
                             .replace(r"\{k\}", "(?P<k>.+?)"), description)
        if found:
            k = found["k"]
            k = int(k) if re.fullmatch(r"-?\d+", k) else k
            rng = random.Random(hashlib.sha256(prompt.encode()).hexdigest())
            values = [_draw(family.arg, rng) for _ in range(N_TESTS)]
            if family.arg == "str" and isinstance(k, str):  # make the constant occur in some inputs
                values[:2] = [k + values[0], values[1] + k + k]
            if family.arg == "strs" and isinstance(k, str):
                values[0] = [k + w for w in values[0]] + ["x"]
            return name, [([v], family.reference(v, k)) for v in values]
    raise ValueError(f"no code family describes {description!r:.100}")


def score(predictions: list[str], examples: list[Example]) -> dict[str, Any]:
    """{"score": pass_rate, "pass_rate", "n", "outcomes": {outcome: count}} where an answer passes when its
    function passes all of its example's hidden tests (outcomes: passed, failed, error, timeout, no_function).
    """
    from tailor.data.tasks.sandbox import run_answers

    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions but {len(examples)} examples; need one each.")
    jobs = []
    for prediction, example in zip(predictions, examples, strict=True):
        name, tests = hidden_tests(example.prompt[-1]["content"])
        jobs.append({"source": extract_code(prediction), "function": name, "tests": tests})
    outcomes = run_answers(jobs, TIME_LIMIT_S)
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    n = len(outcomes)
    rate = counts.get("passed", 0) / n if n else 0.0
    return {"score": rate, "pass_rate": rate, "n": n, "outcomes": counts}


def extract_code(answer: str) -> str:
    """The code in an answer: the body of its first ``` fence when it has one, else the answer itself."""
    fence = re.search(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", answer, re.S)
    return fence.group(1) if fence else answer


TASK = BuiltinTask(
    name="code", kind="code", metric="pass_rate",
    description="Write a small Python function from a one-line description; scored by running hidden unit "
                "tests in a sandboxed subprocess.",
    split_sizes=dict(SPLIT_SIZES), build=build, score=score)

__all__ = ["FAMILIES", "SYSTEM_PROMPT", "TASK", "TIME_LIMIT_S", "build", "extract_code", "hidden_tests",
           "score"]
