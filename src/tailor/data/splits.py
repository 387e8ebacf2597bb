"""Deterministic, disjoint splits for every generated built-in task (support, code, analysis, voice).

A prompt belongs to the split chosen by a hash of its text (train 18, validation 1, test 1 of 20 buckets),
and each split is drawn from its own seeded generator, so the same call always gives the same data and no
prompt occurs in two splits.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from tailor.data.example import Example

SPLITS = ("train", "validation", "test")
SPLIT_SIZES = {"train": 4000, "validation": 200, "test": 200}
_SPLIT_BUCKETS = {"train": range(0, 18), "validation": range(18, 19), "test": range(19, 20)}  # of 20


def split_of(prompt: str) -> str:
    """The split a prompt belongs to (by the sha256 of its text)."""
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 20
    return next(split for split, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def build_split(task: str, system_prompt: str, one: Callable[[random.Random], tuple[str, str]], split: str,
                n: int | None = None) -> list[Example]:
    """The first n (default SPLIT_SIZES[split]) distinct (prompt, answer) pairs `one` draws whose prompt
    hashes into `split`, as chat Examples [system, user, assistant] with source builtin:TASK:SPLIT:INDEX."""
    if split not in SPLITS:
        raise ValueError(f"unknown {task} split {split!r}; use one of: {', '.join(SPLITS)}.")
    n = SPLIT_SIZES[split] if n is None else n
    if n < 0:
        raise ValueError(f"n={n} must be >= 0.")
    rng = random.Random(f"tailor-{task}-{split}")
    seen: set[str] = set()
    examples: list[Example] = []
    misses = 0
    while len(examples) < n:
        prompt, answer = one(rng)
        if prompt in seen or split_of(prompt) != split:
            misses += 1
            if misses > 200 * (n + 100):  # the generator cannot make n distinct prompts: a bug, not a hang
                raise RuntimeError(f"the {task} generator ran out of distinct {split} prompts at "
                                   f"{len(examples)}.")
            continue
        seen.add(prompt)
        examples.append(Example(
            messages=[{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt},
                      {"role": "assistant", "content": answer}],
            text=None, source=f"builtin:{task}:{split}:{len(examples) + 1}"))
    return examples


__all__ = ["SPLITS", "SPLIT_SIZES", "build_split", "split_of"]
