"""Capability retention: general questions the base model answers correctly, re-asked after adaptation.

A narrow fine-tune can cost general ability ("catastrophic forgetting"). These prompts have short,
objectively checkable answers, and each one was kept only after SmolLM2-135M-Instruct (the default
model, from its GGUF, greedy decoding, fp32 and bf16) answered it correctly, so the base model scores
1.0 and any drop is what the adaptation cost. Other base models may miss some; the check reports
per-item results, and comparing base against tuned (compare_base_and_tuned) is what matters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from tailor.eval.generate import generate


@dataclass(frozen=True)
class RetentionItem:
    """A question and a regular expression (searched case-insensitively) that a correct answer matches."""

    prompt: str
    pattern: str

    def is_correct(self, answer: str) -> bool:
        return re.search(self.pattern, answer, flags=re.IGNORECASE) is not None


RETENTION_ITEMS: tuple[RetentionItem, ...] = (
    RetentionItem("What is the capital of France?", r"\bparis\b"),
    RetentionItem("What is the capital of Japan?", r"\btokyo\b"),
    RetentionItem("What is the capital of Germany?", r"\bberlin\b"),
    RetentionItem("What is the capital of England?", r"\blondon\b"),
    RetentionItem("What is the capital of Canada?", r"\bottawa\b"),
    RetentionItem("What is 2 + 2?", r"\b4\b|\bfour\b"),
    RetentionItem("How many days are in a week?", r"\b7\b|\bseven\b"),
    RetentionItem("How many sides does a triangle have?", r"\b3\b|\bthree\b"),
    RetentionItem("What is the opposite of hot?", r"\bcold\b"),
    RetentionItem("What is the opposite of up?", r"\bdown\b"),
    RetentionItem("What is the opposite of big?", r"\bsmall\b|\blittle\b"),
    RetentionItem("What color is the sky on a clear day?", r"\bblue\b"),
    RetentionItem("Which planet is known as the Red Planet?", r"\bmars\b"),
    RetentionItem("What is the chemical symbol for water?", r"\bh2o\b|\bh₂o\b"),
    RetentionItem("What is the boiling point of water in Celsius?", r"\b100\b"),
    RetentionItem("What is the largest ocean on Earth?", r"\bpacific\b"),
    RetentionItem("Translate 'hello' into Spanish.", r"\bhola\b"),
    RetentionItem("What is the plural of 'mouse'?", r"\bmice\b"),
    RetentionItem("What language is spoken in Brazil?", r"\bportuguese\b"),
    RetentionItem("What is the main language spoken in the United States?", r"\benglish\b"),
    RetentionItem("Name the continent where Egypt is located.", r"\bafrica\b"),
)


def retention_check(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: tuple[RetentionItem, ...] = RETENTION_ITEMS,
    max_new_tokens: int = 40,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Ask each item's question (one user turn, greedy) and check the answer.

    Returns n, correct, accuracy, items: [{prompt, answer, ok}].
    """
    answers = generate(
        model, tokenizer, [[{"role": "user", "content": item.prompt}] for item in items],
        max_new_tokens=max_new_tokens, batch_size=batch_size,
    )
    results = [
        {"prompt": item.prompt, "answer": answer, "ok": item.is_correct(answer)}
        for item, answer in zip(items, answers, strict=True)
    ]
    correct = sum(r["ok"] for r in results)
    return {"n": len(results), "correct": correct, "accuracy": correct / len(results) if results else 0.0,
            "items": results}
