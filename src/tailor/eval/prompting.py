"""Prompting baselines: the task asked zero-shot, or with k solved examples in the conversation first."""

from __future__ import annotations

import random

from tailor.data import Example


def with_shots(examples: list[Example], shots: list[Example]) -> list[Example]:
    """Each example with `shots` placed before its question as earlier user/assistant turns.

    The example's own system message (the task instruction) stays first; each shot contributes its
    non-system turns, so the model sees k solved cases in the format it must answer in.
    """
    turns = [m for shot in shots for m in (shot.messages or []) if m["role"] != "system"]
    out = []
    for example in examples:
        messages = example.messages or []
        system = [m for m in messages if m["role"] == "system"]
        rest = [m for m in messages if m["role"] != "system"]
        out.append(Example(messages=[*system, *turns, *rest], text=None, source=example.source))
    return out


def pick_shots(train_examples: list[Example], k: int, seed: int) -> list[Example]:
    """k examples with a final assistant answer from the training split, chosen with `seed`."""
    usable = [e for e in train_examples if e.messages and e.messages[-1].get("role") == "assistant"]
    if k > len(usable):
        raise ValueError(f"few-shot needs {k} training examples with an answer; the data has {len(usable)}")
    return random.Random(seed).sample(usable, k)


__all__ = ["pick_shots", "with_shots"]
