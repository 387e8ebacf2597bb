"""Capability retention: general prompts the base model answers correctly, re-asked after adaptation.

A narrow fine-tune can cost general ability ("catastrophic forgetting"). These prompts span five kinds
(KINDS: facts, arithmetic, instructions, short writing, code), each with an automatic check: a regular
expression searched case-insensitively in the answer. Each one was kept only after SmolLM2-135M-Instruct
(the default model) answered it correctly in greedy decoding through the serving engine both in bf16 and
in fp32, with the check matching within the first RETENTION_MAX_NEW_TOKENS - 2 tokens: an item that a
bf16 near-tie flips is left out, and the base model scores 1.0, so any drop is what the adaptation cost.
Other base models may miss some; the check reports per-item and per-kind results, and comparing base
against tuned (compare_base_and_tuned) is what matters. None of these prompts is used in training: the
replay pool (tailor.data.replay) is disjoint from them, and a test asserts it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from tailor.eval.generate import generate

KINDS = ("fact", "arithmetic", "instruction", "writing", "code")
RETENTION_MAX_NEW_TOKENS = 48  # every kept check matches within 46 tokens of the base model's answer


@dataclass(frozen=True)
class RetentionItem:
    """A prompt of one of KINDS and a regular expression (searched case-insensitively) that a correct
    answer matches."""

    kind: str
    prompt: str
    pattern: str

    def is_correct(self, answer: str) -> bool:
        return re.search(self.pattern, answer, flags=re.IGNORECASE) is not None


def _number(prompt: str, answers: str) -> RetentionItem:
    """Arithmetic: the answer holds the number (digits or words) as a whole word; none of the prompts
    contains its own answer."""
    return RetentionItem("arithmetic", prompt, rf"\b(?:{answers})\b")


def _writing(prompt: str, words: str) -> RetentionItem:
    """Short writing: at least six words, one of them on the topic asked for, and not the request echoed."""
    echo = re.escape(" ".join(prompt.split()[:3]))
    return RetentionItem("writing", prompt, rf"^(?!\W*{echo})(?=(?:\S+\s+){{5}})[\s\S]*\b(?:{words})")


def _function(prompt: str, body: str) -> RetentionItem:
    """Code: a Python function definition whose text after `def name(` matches `body`."""
    return RetentionItem("code", prompt, r"def\s+\w+\s*\(" + body)


def _three_of(words: str) -> str:
    """Three mentions of the alternatives in `words` (a list of three, possibly with repeats)."""
    return r"[\s\S]*".join([rf"\b{words}\b"] * 3)


def _all_of(*words: str) -> str:
    """Every one of `words`, in any order."""
    return "".join(rf"(?=[\s\S]*\b{word}\b)" for word in words)


_COLORS = r"(?:red|blue|green|yellow|orange|purple|black|white|pink|brown|gr[ae]y|violet)"
_ANIMALS = (r"(?:dogs?|cats?|lions?|tigers?|elephants?|horses?|cows?|birds?|fish|bears?|monkeys?|rabbits?"
            r"|giraffes?|zebras?|wolf|wolves|fox(?:es)?|pigs?|sheep|deer|snakes?)")

RETENTION_ITEMS: tuple[RetentionItem, ...] = (
    # fact
    RetentionItem("fact", "What is the capital of France?", r"\bparis\b"),
    RetentionItem("fact", "What is the capital of Japan?", r"\btokyo\b"),
    RetentionItem("fact", "What is the capital of Germany?", r"\bberlin\b"),
    RetentionItem("fact", "What is the capital of England?", r"\blondon\b"),
    RetentionItem("fact", "What is the capital of Canada?", r"\bottawa\b"),
    RetentionItem("fact", "What is the capital of Russia?", r"\bmoscow\b"),
    RetentionItem("fact", "What is the capital of China?", r"\bbeijing\b"),
    RetentionItem("fact", "What is the capital of Egypt?", r"\bcairo\b"),
    RetentionItem("fact", "What is the capital of Greece?", r"\bathens\b"),
    RetentionItem("fact", "What is the capital of Ireland?", r"\bdublin\b"),
    RetentionItem("fact", "What is the capital of Australia?", r"\bcanberra\b"),
    RetentionItem("fact", "What is the capital of India?", r"\bnew delhi\b"),
    RetentionItem("fact", "What is the capital of Norway?", r"\boslo\b"),
    RetentionItem("fact", "What is the capital of Sweden?", r"\bstockholm\b"),
    RetentionItem("fact", "What is the capital of Austria?", r"\bvienna\b"),
    RetentionItem("fact", "What is the capital of Thailand?", r"\bbangkok\b"),
    RetentionItem("fact", "What is the capital of Kenya?", r"\bnairobi\b"),
    RetentionItem("fact", "What is the capital of Poland?", r"\bwarsaw\b"),
    RetentionItem("fact", "What is the capital of South Korea?", r"\bseoul\b"),
    RetentionItem("fact", "What is the capital of the Netherlands?", r"\bamsterdam\b"),
    RetentionItem("fact", "What is the largest ocean on Earth?", r"\bpacific\b"),
    RetentionItem("fact", "What language is spoken in Brazil?", r"\bportuguese\b"),
    RetentionItem("fact", "What is the main language spoken in the United States?", r"\benglish\b"),
    RetentionItem("fact", "Name the continent where Egypt is located.", r"\bafrica\b"),
    RetentionItem("fact", "What is the chemical symbol for water?", r"\bh2o\b|\bh₂o\b"),
    RetentionItem("fact", "What is the chemical symbol for gold?", r"\bau\b"),
    RetentionItem("fact", "Who wrote Romeo and Juliet?", r"\bshakespeare\b"),
    RetentionItem("fact", "What is the tallest mountain in the world?", r"\beverest\b"),
    RetentionItem("fact", "What gas do plants absorb from the air?", r"carbon dioxide|\bco2\b|\bco₂\b"),
    RetentionItem("fact", "What is the boiling point of water in Celsius?", r"\b100\b"),
    RetentionItem("fact", "What color is the sky on a clear day?", r"\bblue\b"),
    RetentionItem("fact", "What is the largest mammal?", r"\bwhales?\b"),
    RetentionItem("fact", "Who painted the Mona Lisa?", r"\bleonardo\b|\bda vinci\b"),
    RetentionItem("fact", "What is the currency of Japan?", r"\byen\b"),
    RetentionItem("fact", "Who discovered gravity?", r"\bnewton\b"),
    RetentionItem("fact", "What is the plural of 'mouse'?", r"\bmice\b"),
    RetentionItem("fact", "What is the plural of 'child'?", r"\bchildren\b"),
    RetentionItem("fact", "What is the opposite of hot?", r"\bcold\b"),
    RetentionItem("fact", "What is the opposite of up?", r"\bdown\b"),
    RetentionItem("fact", "What is the opposite of big?", r"\bsmall\b|\blittle\b"),
    RetentionItem("fact", "What is the opposite of day?", r"\bnight\b"),
    RetentionItem("fact", "What is the opposite of happy?", r"\bsad\b|\bunhappy\b"),
    RetentionItem("fact", "Which organ pumps blood through the body?", r"\bheart\b"),
    # arithmetic
    _number("What is 2 + 2?", "4|four"),
    _number("What is 7 + 6?", "13|thirteen"),
    _number("What is 12 divided by 4?", "3|three"),
    _number("What is 15 + 10?", "25|twenty-five"),
    _number("What is 20 - 5?", "15|fifteen"),
    _number("What is 50 + 50?", "100|one hundred"),
    _number("What is 11 + 11?", "22|twenty-two"),
    _number("What is 3 times 3?", "9|nine"),
    _number("What is half of 10?", "5|five"),
    _number("How many days are in a week?", "7|seven"),
    _number("How many sides does a triangle have?", "3|three"),
    _number("How many sides does a square have?", "4|four"),
    _number("How many seconds are in a minute?", "60|sixty"),
    _number("How many grams are in a kilogram?", "1,?000|one thousand"),
    _number("How many centimeters are in a meter?", "100|one hundred"),
    _number("What is 1 + 1?", "2|two"),
    _number("What is 30 + 12?", "42|forty-two"),
    _number("What is 25 + 25?", "50|fifty"),
    _number("How many legs does a dog have?", "4|four"),
    # instruction
    RetentionItem("instruction", "Convert 'hello world' to uppercase.", r"(?-i:HELLO WORLD)"),
    RetentionItem("instruction", "List three colors.", _three_of(_COLORS)),
    RetentionItem("instruction", "Name three animals.", _three_of(_ANIMALS)),
    RetentionItem("instruction", "Write the numbers from 1 to 10, separated by commas.",
                  r",\s*".join(str(n) for n in range(1, 11))),
    RetentionItem("instruction", "Name the days of the weekend.", _all_of("saturday", "sunday")),
    RetentionItem("instruction", "List the primary colors.", _all_of("red", "blue", "yellow")),
    RetentionItem("instruction", "Name the four seasons.",
                  _all_of("spring", "summer", "(?:autumn|fall)", "winter")),
    RetentionItem("instruction", "Give me a synonym for 'happy'.",
                  r"\b(?:joyful|glad|cheerful|content|delighted|pleased|joyous|elated|jubilant|ecstatic|merry)\b"),
    RetentionItem("instruction", "Give me an antonym for 'fast'.", r"\bslow\b"),
    RetentionItem("instruction", "Complete the sequence: 2, 4, 6, 8, ...", r"\b10\b"),
    # writing
    _writing("Write a sentence about a cat.", r"cats?"),
    _writing("Write a haiku about the moon.", r"moon"),
    _writing("Write a one-sentence story about a dragon.", r"dragons?"),
    _writing("Write a sentence using the word 'happy'.", r"happy"),
    _writing("Write two sentences about dogs.", r"dogs?"),
    _writing("Write a sentence about the importance of exercise.", r"exercise"),
    _writing("Write a short poem about flowers.", r"flowers?|blooms?|petals?"),
    _writing("Describe a sunset in one sentence.", r"sun|sunset|sky"),
    _writing("Write a sentence about the ocean.", r"ocean|sea"),
    _writing("Write a motivational quote about learning.", r"learn|learning|knowledge"),
    _writing("Write a sentence about winter.", r"winter|snow|cold"),
    _writing("Write a short poem about the stars.", r"stars?|night|sky"),
    _writing("Write a sentence describing a forest.", r"forest|trees?"),
    _writing("Write a short note congratulating someone on a new job.", r"congratulations?|new job"),
    _writing("Write a one-line slogan for a bakery.",
             r"bak(?:e|ed|ery|ing)|bread|cakes?|pastr(?:y|ies)|fresh"),
    _writing("Write a sentence about the importance of sleep.", r"sleep"),
    _writing("Write a short story about a robot.", r"robots?"),
    _writing("Write a sentence about your favorite food.", r"food|eat|pizza|delicious"),
    # code
    _function("Write a Python function that adds two numbers.",
              r"\s*\w+\s*,\s*\w+\s*\)[\s\S]*\breturn\b[\s\S]*\+"),
    _function("Write a Python function that returns the square of a number.",
              r"[\s\S]*\breturn\b[^\n]*(?:\*\*\s*2|\w\s*\*\s*\w)"),
    _function("Write a Python function to check if a number is even.", r"[\s\S]*%\s*2"),
    _function("Write a Python function that reverses a string.", r"[\s\S]*(?:\[::-1\]|reversed\()"),
    RetentionItem("code", "How do you print 'Hello, World!' in Python?",
                          r"""print\(\s*["']Hello,? World!?["']\s*\)"""),
    RetentionItem("code", "What keyword defines a function in Python?", r"\bdef\b"),
    RetentionItem("code", "Write a for loop in Python that prints the numbers 0 to 4.",
                          r"for\s+\w+\s+in\s+range\("),
    _function("Write a Python function that returns the largest number in a list.", r"[\s\S]*(?:max\(|>)"),
    RetentionItem("code", "What does the len() function do in Python?",
                          r"length|number of (?:items|elements|characters)"),
    RetentionItem("code", "Write the HTML tag for a paragraph.", r"<p>"),
    RetentionItem("code", "Write a SQL query that selects all rows from a table named users.",
                          r"select\s+\*\s+from\s+users"),
    RetentionItem("code", "How do you write a comment in Python?", r"#"),
    RetentionItem("code", "Write a JavaScript function that adds two numbers.", r"(?:function|=>)[\s\S]*\+"),
    _function("Write a Python function that returns the sum of a list of numbers.", r"[\s\S]*(?:sum\(|\+=)"),
    RetentionItem("code", "What is the output of print(2 + 3) in Python?", r"\b5\b"),
    RetentionItem("code", "How do you import the math module in Python?", r"import\s+math"),
    RetentionItem("code", "Write a while loop in Python.", r"\bwhile\b[^\n]*:"),
    RetentionItem("code", "How do you create an empty list in Python?", r"\[\s*\]|list\(\)"),
    RetentionItem("code", "Which shell command lists the files in a directory?", r"\bls\b|\bdir\b"),
    RetentionItem("code", "Write a Python class named Dog.", r"class\s+Dog\b"),
    RetentionItem("code", "How do you open a file for reading in Python?", r"open\("),
    _function("Write a Python function that checks whether a string is a palindrome.", r"[\s\S]*\[::-1\]"),
    RetentionItem("code", "What symbol starts a comment in a bash script?", r"#"),
)


def retention_check(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: tuple[RetentionItem, ...] = RETENTION_ITEMS,
    max_new_tokens: int = RETENTION_MAX_NEW_TOKENS,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Ask each item's question (one user turn, greedy) and check the answer.

    Returns n, correct, accuracy, per_kind: {kind: {n, correct, accuracy}}, items: [{kind, prompt, answer,
    ok}].
    """
    answers = generate(
        model, tokenizer, [[{"role": "user", "content": item.prompt}] for item in items],
        max_new_tokens=max_new_tokens, batch_size=batch_size,
    )
    results = [
        {"kind": item.kind, "prompt": item.prompt, "answer": answer, "ok": item.is_correct(answer)}
        for item, answer in zip(items, answers, strict=True)
    ]
    return {**_tally(results), "per_kind": {kind: _tally([r for r in results if r["kind"] == kind])
                                             for kind in dict.fromkeys(r["kind"] for r in results)},
            "items": results}


def off_task(retention: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """How often general prompts were answered in the task's format (`in_task_format`: an object opened
    with `{` or holding one of the task's `fields`): the adapter answering everything as its task. From
    `retention_check`'s result.

    Returns n, count, rate, fields.
    """
    from tailor.eval.structured import in_task_format

    count = sum(in_task_format(item["answer"], fields) for item in retention["items"])
    n = len(retention["items"])
    return {"n": n, "count": count, "rate": count / n if n else 0.0, "fields": list(fields)}


def _tally(results: list[dict[str, Any]]) -> dict[str, Any]:
    correct = sum(r["ok"] for r in results)
    return {"n": len(results), "correct": correct, "accuracy": correct / len(results) if results else 0.0}
