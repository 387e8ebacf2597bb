"""Built-in support-ticket dataset: deterministic, disjoint splits, valid learnable labels.

Its token budget with the real tokenizer is checked in test_data.py (which loads that tokenizer once).
"""

from __future__ import annotations

import collections
import json
import re

import pytest

from tailor.data import load_examples
from tailor.data.support import (
    INTENTS,
    PRODUCTS,
    SENTIMENT_CUES,
    SENTIMENTS,
    SPLIT_SIZES,
    SPLITS,
    SUPPORT_FIELDS,
    SYSTEM_PROMPT,
    URGENCIES,
    URGENCY_CUES,
    build_support_split,
    write_support_jsonl,
)

ORDER_ID = re.compile(r"ORD-\d{5}")


@pytest.fixture(scope="module")
def splits():
    return {split: build_support_split(split) for split in SPLITS}


def parts(example):
    system, user, assistant = example.messages
    assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
    assert system["content"] == SYSTEM_PROMPT
    return user["content"], json.loads(assistant["content"]), assistant["content"]


def test_deterministic_and_prefix_stable():
    first = build_support_split("validation")
    assert first == build_support_split("validation")
    assert build_support_split("validation", n=50) == first[:50]
    assert [e.source for e in first[:2]] == ["builtin:support:validation:1", "builtin:support:validation:2"]
    assert load_examples("builtin:support:validation") == first
    with pytest.raises(ValueError, match="unknown support split 'dev'"):
        build_support_split("dev")


def test_splits_have_their_sizes_and_never_overlap(splits):
    texts = {split: [parts(e)[0] for e in examples] for split, examples in splits.items()}
    for split, messages in texts.items():
        assert len(messages) == SPLIT_SIZES[split] == len(set(messages))
    assert not set(texts["train"]) & set(texts["test"])
    assert not set(texts["train"]) & set(texts["validation"])
    assert not set(texts["validation"]) & set(texts["test"])


def test_every_label_is_valid_and_determined_by_the_message(splits):
    for example in [e for examples in splits.values() for e in examples]:
        message, label, raw = parts(example)
        assert tuple(label) == SUPPORT_FIELDS
        assert raw == json.dumps(label, separators=(",", ":"))  # compact, key order kept
        assert label["intent"] in INTENTS
        assert label["urgency"] in URGENCIES and label["sentiment"] in SENTIMENTS
        ids = ORDER_ID.findall(message)
        if label["order_id"] is None:
            assert not ids
        else:
            assert ORDER_ID.fullmatch(label["order_id"]) and label["order_id"] in ids
        if label["product"] is None:
            assert not any(product in message for product in PRODUCTS)
        else:
            assert label["product"] in PRODUCTS and label["product"] in message
        for urgency, cues in URGENCY_CUES.items():
            assert any(cue in message for cue in cues) == (label["urgency"] == urgency), message
        for sentiment, cues in SENTIMENT_CUES.items():
            assert any(cue in message for cue in cues) == (label["sentiment"] == sentiment), message
        assert 5 <= len(message.split()) <= 70


def test_distribution_covers_every_value_and_the_hard_cases(splits):
    train = [parts(e) for e in splits["train"]]
    counts = {field: collections.Counter(label[field] for _, label, _ in train) for field in SUPPORT_FIELDS}
    assert set(counts["intent"]) == set(INTENTS)
    assert min(counts["intent"].values()) > 0.05 * len(train)
    assert set(counts["urgency"]) == set(URGENCIES) and set(counts["sentiment"]) == set(SENTIMENTS)
    for field in ("order_id", "product"):
        missing = counts[field][None]
        assert 0.2 * len(train) < missing < 0.6 * len(train)
    assert len(counts["product"]) == len(PRODUCTS) + 1
    two_ids = sum(len(ORDER_ID.findall(message)) == 2 for message, _, _ in train)
    two_products = sum(sum(p in message for p in PRODUCTS) >= 2 for message, _, _ in train)
    assert two_ids > 0.05 * len(train) and two_products > 0.05 * len(train)  # distractors
    words = [len(message.split()) for message, _, _ in train]
    assert 20 <= sum(words) / len(words) <= 40


@pytest.mark.parametrize("fmt", ["chat", "alpaca", "prompt_completion"])
def test_written_jsonl_loads_back(tmp_path, fmt):
    path = write_support_jsonl(tmp_path / "sub" / f"{fmt}.jsonl", "test", n=5, format=fmt)
    loaded, built = load_examples(path), build_support_split("test", n=5)
    assert [e.reference for e in loaded] == [e.reference for e in built]
    if fmt == "chat":
        assert [e.messages for e in loaded] == [e.messages for e in built]
    else:
        assert loaded[0].messages[0]["content"].startswith(SYSTEM_PROMPT)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
