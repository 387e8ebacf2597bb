"""Preference data: a prompt, the answer preferred (chosen) and one not (rejected), for DPO and ORPO.

Records (any file kind tailor.data reads: JSONL, JSON, CSV, parquet, a saved dataset, a directory):

- {"prompt": "...", "chosen": "...", "rejected": "..."}: a user prompt and two answers (plain text);
- {"prompt": [messages...], "chosen": [{"role": "assistant", ...}] | "...", "rejected": ...}: a
  conversation before the answers (TRL's conversational prompt format);
- {"chosen": [messages...], "rejected": [messages...]}: two whole conversations that differ only in their
  last (assistant) turn (the format of Anthropic HH and TRL's implicit prompt).

Each side is tokenized as SFT tokenizes a conversation (the chat template, loss labels on the answer only),
so a pair is two TokenizedExamples that share their prompt tokens. The built-in set `builtin:support-prefs`
is made from the support task: chosen is the right JSON, rejected a plausible wrong one (another intent,
another order id, or JSON that does not parse).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailor.data.errors import DataError, DataIssue
from tailor.data.example import Example
from tailor.data.tokenize import TokenizedExample, TokenizeStats, tokenize_examples

PREFERENCE_BUILTIN = "support-prefs"
_EXAMPLE = '{"prompt": "2+2=", "chosen": "4", "rejected": "5"}'


@dataclass(frozen=True)
class PreferencePair:
    """A conversation up to the answer, the preferred answer and the other one."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    source: str = ""

    def sides(self) -> tuple[Example, Example]:
        def side(answer: str, tag: str) -> Example:
            return Example([*self.prompt, {"role": "assistant", "content": answer}], None,
                           f"{self.source}#{tag}")

        return side(self.chosen, "chosen"), side(self.rejected, "rejected")


@dataclass
class TokenizedPair:
    """The two sides of a pair as SFT tokenizes them. `input_ids` is the longer side's, so that batching
    by length (tailor.data.batch_indices) sees the pair's cost."""

    chosen: TokenizedExample
    rejected: TokenizedExample

    @property
    def input_ids(self) -> list[int]:
        return max(self.chosen.input_ids, self.rejected.input_ids, key=len)

    @property
    def source(self) -> str:
        return self.chosen.source.removesuffix("#chosen")


def _answer(value: Any, field: str, issue) -> str | None:
    """An answer given as text or as a one-message assistant list."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("content") if value[0].get("role") == "assistant" else None
    if not isinstance(value, str) or not value.strip():
        issue(f"must be a non-empty answer (text, or [{{'role': 'assistant', 'content': ...}}]), got "
              f"{json.dumps(value)[:40]}.", f"write it like {_EXAMPLE}.", field)
        return None
    return value


def _messages(value: Any, field: str, issue) -> list[dict[str, str]] | None:
    if (not isinstance(value, list) or not value
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                       and m.get("role") in ("system", "user", "assistant") for m in value)):
        issue("must be a non-empty list of {role, content} messages.", f"write it like {_EXAMPLE}.", field)
        return None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def pair_from_record(record: Any, source: str, issue) -> PreferencePair | None:
    """A PreferencePair from one record of any of the three formats; problems go to `issue`."""
    if not isinstance(record, dict):
        issue("must be an object with prompt, chosen and rejected.", f"write it like {_EXAMPLE}.", None)
        return None
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        issue(f"is missing {' and '.join(missing)}.", f"a preference record is like {_EXAMPLE}.", missing[0])
        return None
    if "prompt" in record:
        raw = record["prompt"]
        if isinstance(raw, str):
            prompt = [{"role": "user", "content": raw}] if raw.strip() else None
            if prompt is None:
                issue("is empty.", "fill it in or remove this record.", "prompt")
        else:
            prompt = _messages(raw, "prompt", issue)
        chosen, rejected = _answer(record["chosen"], "chosen", issue), _answer(record["rejected"], "rejected",
                                                                               issue)
        if prompt is None or chosen is None or rejected is None:
            return None
        return PreferencePair(prompt, chosen, rejected, source)
    chosen_chat = _messages(record["chosen"], "chosen", issue)
    rejected_chat = _messages(record["rejected"], "rejected", issue)
    if chosen_chat is None or rejected_chat is None:
        return None
    if chosen_chat[:-1] != rejected_chat[:-1] or chosen_chat[-1]["role"] != "assistant" \
            or rejected_chat[-1]["role"] != "assistant":
        issue("chosen and rejected must be the same conversation up to their last turn, which is the "
              "assistant's.", "give the shared turns once as prompt: and the two answers as chosen/rejected.",
              "rejected")
        return None
    return PreferencePair(chosen_chat[:-1], chosen_chat[-1]["content"], rejected_chat[-1]["content"], source)


def load_preferences(spec: str | Path, split: str | None = None) -> list[PreferencePair]:
    """The preference pairs of a file (any kind tailor.data reads) or of `builtin:support-prefs[:split]`.

    Raises:
        DataError: every bad record, named by file, line (or row) and field.
    """
    from tailor.data.load import BUILTIN_PREFIX
    from tailor.data.readers import read_path

    spec = str(spec)
    if spec.startswith(BUILTIN_PREFIX):
        return builtin_preferences(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(DataIssue(spec, "not found.", "give a preference file (prompt, chosen, rejected) or "
                                  f"builtin:{PREFERENCE_BUILTIN}."))
    issues: list[DataIssue] = []
    pairs = []
    for part in read_path(path, split):
        issues.extend(part.issues)
        for number, record in part.records:
            def issue(problem: str, fix: str, field: str | None, number: int = number, part=part) -> None:
                issues.append(DataIssue(part.name, problem, fix, line=number, field=field, unit=part.unit))

            pair = pair_from_record(record, f"{part.name}:{number}", issue)
            if pair is not None:
                pairs.append(pair)
    if not pairs and not issues:
        issues.append(DataIssue(spec, "holds no preference records.", f"add records like {_EXAMPLE}."))
    if issues:
        raise DataError(issues)
    return pairs


def builtin_preferences(spec: str) -> list[PreferencePair]:
    """`builtin:support-prefs[:train|validation|test]`: the support task's split, each ticket's right JSON
    as chosen and a plausible wrong one as rejected (cycling: another intent, another order id, broken
    JSON), decided by a seeded generator: the same spec gives the same pairs."""
    from tailor.data import support

    parts = spec.split(":")
    name, split = parts[1], (parts[2] if len(parts) > 2 else "train")
    if name != PREFERENCE_BUILTIN or len(parts) > 3 or split not in support.SPLITS:
        choices = ", ".join(f"builtin:{PREFERENCE_BUILTIN}:{s}" for s in support.SPLITS)
        raise DataError(DataIssue(spec, "unknown built-in preference set.", f"use one of: {choices}."))
    rng = random.Random(f"tailor-support-prefs-{split}")
    pairs = []
    for index, example in enumerate(support.build_support_split(split)):
        *prompt, answer = example.messages
        source = example.source.replace("builtin:support", f"builtin:{PREFERENCE_BUILTIN}")
        rejected = wrong_answer(answer["content"], index, rng)
        pairs.append(PreferencePair(list(prompt), answer["content"], rejected, source))
    return pairs


def wrong_answer(right: str, index: int, rng: random.Random) -> str:
    """A plausible wrong answer to a support ticket: by `index` mod 3, another intent, another order id (or
    one where there is none), or the right fields in JSON that does not parse."""
    from tailor.data import support

    label = json.loads(right)
    kind = index % 3
    if kind == 0:
        label["intent"] = rng.choice([i for i in support.INTENTS if i != label["intent"]])
    elif kind == 1:
        digits = f"{rng.randrange(10000, 100000)}"
        label["order_id"] = f"ORD-{digits}" if label["order_id"] != f"ORD-{digits}" else "ORD-00000"
    else:
        broken = json.dumps(label, separators=(",", ":"))
        return broken[:-1] if index % 2 else broken.replace('"', "'")  # unclosed, or single-quoted
    return json.dumps(label, separators=(",", ":"))


def tokenize_pairs(pairs: list[PreferencePair], tokenizer: Any, max_seq_len: int, overflow: str = "truncate",
                   ) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Both sides of each pair tokenized as SFT tokenizes a conversation; a pair is kept when both sides
    are (the overflow policy applies to each side)."""
    sides = [side for pair in pairs for side in pair.sides()]
    tokenized, stats = tokenize_examples(sides, tokenizer, max_seq_len, overflow)
    by_source = {t.source: t for t in tokenized}
    kept = [TokenizedPair(by_source[f"{p.source}#chosen"], by_source[f"{p.source}#rejected"])
            for p in pairs if f"{p.source}#chosen" in by_source and f"{p.source}#rejected" in by_source]
    if not kept:
        raise DataError(DataIssue(pairs[0].source if pairs else "<data>", "no pair left after filtering.",
                                  "raise max_seq_len or use overflow='truncate'."))
    return kept, stats


__all__ = ["PREFERENCE_BUILTIN", "PreferencePair", "TokenizedPair", "builtin_preferences", "load_preferences",
           "pair_from_record", "tokenize_pairs", "wrong_answer"]
