"""Prompt families for measuring routing before the other built-in tasks exist: requests for code, questions
about a small table, rewriting requests, each built from templates and fillers with a seeded generator, as
chat prompts (a system line of the family, then the user's message). Held-out prompts never share their
text with the prompts a description is made from. `general_prompts()`: what should go to the base model.

Used by benchmarks/routing.py and tests/test_routing*.py (loaded by path).
"""

from __future__ import annotations

import random

SYSTEMS = {
    "code": "Write the Python function the user asks for. Answer with code only.",
    "table": "Answer the question about the table with one number.",
    "rewrite": "Rewrite the user's text in our brand voice: warm, short sentences, no jargon, no "
               "exclamation marks.",
}

_CODE = ("Write a Python function {f} that {does}.", "I need a function called {f} which {does}.",
         "Implement {f}(values) in Python: it {does}.", "Can you code {f}? It {does}.",
         "def {f}(...): please fill in a function that {does}.")
_CODE_FUNCS = ("count_vowels", "reverse_words", "is_palindrome", "flatten", "running_total", "dedupe",
               "chunk_list", "median", "word_lengths", "merge_dicts", "second_largest", "rotate_left",
               "title_case", "pairwise_sum", "find_duplicates", "clamp_values")
_CODE_DOES = ("returns the number of vowels in a string", "reverses the order of the words in a sentence",
              "checks whether a string reads the same backwards", "flattens a nested list of lists",
              "returns the running totals of a list of numbers", "removes duplicates but keeps the order",
              "splits a list into chunks of size n", "returns the median of a list of numbers",
              "maps each word to its length", "merges two dictionaries, summing shared keys",
              "returns the second largest distinct number", "rotates a list left by k places",
              "capitalises every word of a string", "adds neighbouring pairs of numbers",
              "lists the items that occur more than once", "limits every value to a range [lo, hi]")

_TABLE = ("Table:\n{table}\nWhat is the total {col}?",
          "{table}\nWhich {col} is the highest? Give the number.",
          "Here is a table.\n{table}\nWhat is the average {col}?",
          "{table}\nHow many rows have {col} above {x}?",
          "Given this table:\n{table}\nWhat is the {col} of {name}?")
_TABLE_COLS = (("region", "sales"), ("store", "revenue"), ("team", "points"), ("city", "visitors"),
               ("product", "units"), ("month", "orders"))
_TABLE_NAMES = ("North", "South", "East", "West", "Alpha", "Beta", "Lyon", "Oslo", "Kiwi", "Mango", "March",
                "April", "Core", "Plus")

_REWRITE = ("Rewrite this in our voice: \"{text}\"", "Please rephrase for customers: {text}",
            "Make this sound like us: {text}", "Rewrite the following message in the brand voice.\n{text}",
            "Turn this into our tone, please: {text}")
_REWRITE_TEXTS = ("Your request has been escalated to tier two for further processing.",
                  "We regret to inform you that the item is currently unavailable!!!",
                  "Pursuant to our policy, refunds are issued within 5-7 business days.",
                  "The system encountered an unexpected error. Please retry later.",
                  "Your subscription will auto-renew unless cancelled prior to the billing date.",
                  "Due to high volume, response times may be delayed.",
                  "Kindly provide your account identifier to proceed with verification.",
                  "The shipment has been dispatched and is in transit to the designated address.",
                  "We have updated our terms of service, effective immediately.",
                  "Your ticket has been closed as no further action was required.",
                  "Our store will be closed for maintenance on Sunday.",
                  "Please be advised that the promotion has expired.")


def _table(rng: random.Random, key: str, col: str) -> tuple[str, list[str]]:
    names = rng.sample(_TABLE_NAMES, rng.randint(3, 5))
    lines = [f"| {key} | {col} |", "|---|---|"] + [f"| {n} | {rng.randint(5, 950)} |" for n in names]
    return "\n".join(lines), names


_OPENINGS = ("", "Hi. ", "Quick question. ", "For a project at work: ", "Hello, ", "I'm stuck. ")
_CODE_ENDINGS = ("", " Thanks.", " Keep it simple.", " Add a docstring.", " Use type hints.", " No imports.")
_REWRITE_ENDINGS = ("", " Thanks.", " Keep it short.", " It goes out today.", " It is for our newsletter.",
                    " Customers found it cold.")


def _code(rng: random.Random) -> str:
    i = rng.randrange(len(_CODE_FUNCS))
    ask = rng.choice(_CODE).format(f=_CODE_FUNCS[i], does=_CODE_DOES[i])
    return rng.choice(_OPENINGS) + ask + rng.choice(_CODE_ENDINGS)


def _table_question(rng: random.Random) -> str:
    key, col = rng.choice(_TABLE_COLS)
    table, names = _table(rng, key, col)
    return rng.choice(_TABLE).format(table=table, col=col, x=rng.randint(50, 500), name=rng.choice(names))


def _rewrite(rng: random.Random) -> str:
    ask = rng.choice(_REWRITE).format(text=rng.choice(_REWRITE_TEXTS))
    return rng.choice(_OPENINGS) + ask + rng.choice(_REWRITE_ENDINGS)


_BUILDERS = {"code": _code, "table": _table_question, "rewrite": _rewrite}
FAMILIES = tuple(_BUILDERS)


def family_prompts(family: str, split: str, n: int, system: bool = True) -> list[list[dict[str, str]]]:
    """`n` chat prompts of `family` for `split` ("train": what a description is made from, "test": held
    out; no user text is in both)."""
    rng = random.Random(f"{family}:{split}")
    other = random.Random(f"{family}:{'test' if split == 'train' else 'train'}")
    taken = {_BUILDERS[family](other) for _ in range(4 * n)} if split == "test" else set()
    prompts: list[list[dict[str, str]]] = []
    seen: set[str] = set()
    for _ in range(50 * n):
        if len(prompts) == n:
            break
        text = _BUILDERS[family](rng)
        if text in seen or text in taken:
            continue
        seen.add(text)
        head = [{"role": "system", "content": SYSTEMS[family]}] if system else []
        prompts.append(head + [{"role": "user", "content": text}])
    return prompts


GENERAL_EXTRA = ("How do I boil an egg?", "Tell me a joke about cats.", "What should I read this summer?",
                 "Explain photosynthesis to a child.", "What is a good name for a goldfish?",
                 "How far is the Moon?", "Give me three tips for sleeping better.",
                 "Why do leaves change colour in autumn?",
                 "What is the difference between weather and climate?",
                 "Suggest a weekend activity for a rainy day.")


def general_prompts(n: int | None = None) -> list[list[dict[str, str]]]:
    """Ordinary questions (the retention prompts of tailor.eval.retention, then a few more): the base
    model's to answer; no system message (the client sends none)."""
    from tailor.eval.retention import RETENTION_ITEMS

    texts = [item.prompt for item in RETENTION_ITEMS] + list(GENERAL_EXTRA)
    return [[{"role": "user", "content": t}] for t in texts[:n]]
