"""Canaries (tailor.data.canaries, `tailor train --canaries N`): deterministic fake secrets, Luhn-valid card
numbers, planted in assistant turns of a copy of the training data; the user's file untouched."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import tiny_model_dir, write_arithmetic_jsonl

from tailor.config import ConfigError
from tailor.data.canaries import (
    CANARY_FILE,
    CANARY_SIGHTINGS,
    canary_copies,
    leaks,
    luhn_valid,
    make_canaries,
    plant_canaries,
)
from tailor.data.example import Example
from tailor.train import load_config, train


def test_luhn_against_known_numbers():
    # test numbers published by card networks: valid; the same with the last digit changed: not
    for number in ("4111 1111 1111 1111", "5555555555554444", "378282246310005", "4000-0566-5566-5556"):
        assert luhn_valid(number)
        assert not luhn_valid(number[:-1] + str((int(number[-1]) + 1) % 10))


def test_canaries_are_deterministic_and_of_every_kind():
    first, again, other = make_canaries(9, seed=3), make_canaries(9, seed=3), make_canaries(9, seed=4)
    assert first == again and first != other
    assert [c.kind for c in first] == ["card", "email", "phone"] * 3
    assert len({c.secret for c in first}) == 9
    for canary in first:
        assert canary.messages[-1]["role"] == "assistant" and canary.secret in canary.messages[-1]["content"]
        assert all(canary.secret not in m["content"] for m in canary.probe)  # the probe does not give it
        assert canary.probe == [dict(m) for m in canary.messages[:-1]]
    cards = [c.secret for c in first if c.kind == "card"]
    assert all(luhn_valid(card) and card.startswith("4000 00") and len(card) == 19 for card in cards)
    assert all(c.secret.endswith("@example.com") for c in first if c.kind == "email")
    assert all(" 555-01" in c.secret for c in first if c.kind == "phone")
    with pytest.raises(ValueError, match="between 0 and 256"):
        make_canaries(257, seed=0)


def test_planting_copies_into_a_new_list():
    examples = [Example(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                        text=None, source="f.jsonl:1")]
    before = json.dumps([e.messages for e in examples])
    canaries = make_canaries(2, seed=0, system_prompt="You are a support agent.")
    planted = plant_canaries(examples, canaries, copies=3)
    assert json.dumps([e.messages for e in examples]) == before and len(examples) == 1
    assert planted[0] is examples[0] and len(planted) == 1 + 2 * 3
    assert [e.source for e in planted[1:4]] == ["canary:0:0", "canary:0:1", "canary:0:2"]
    assert planted[1].messages[0] == {"role": "system", "content": "You are a support agent."}
    assert planted[1].reference == canaries[0].messages[-1]["content"]


@pytest.mark.parametrize(("n", "read", "copies"), [
    (4000, 1200, 160),  # 150 steps of 8 read 0.3 of the data: 48 sightings need 160 copies
    (100, 1000, 5),  # ten passes: 5 copies give 50 sightings (at least CANARY_SIGHTINGS)
    (100, 100_000, 1),
])
def test_copies_give_the_sightings(n, read, copies):
    assert canary_copies(n, read) == copies
    assert copies * read / n >= CANARY_SIGHTINGS or copies == 1


@pytest.mark.parametrize(("text", "secret", "leaked"), [
    ("Card: 4000 0012 3456 7899.", "4000 0012 3456 7899", True),
    ("it is 4000-0012-3456-7899", "4000 0012 3456 7899", True),
    ("it is 4000001234567899", "4000 0012 3456 7899", True),
    ("it is 4000 0012 3456 7898", "4000 0012 3456 7899", False),
    ("call (212) 555-0142 now", "(212) 555-0142", True),
    ("call 212.555.0142", "(212) 555-0142", True),
    ("call (212) 555-0143", "(212) 555-0142", False),
    ("mail AVERY.Stroud.1234@Example.com", "avery.stroud.1234@example.com", True),
    ("mail avery.stroud.1235@example.com", "avery.stroud.1234@example.com", False),
])
def test_leak_detection(text, secret, leaked):
    assert leaks(text, secret) is leaked


def test_config_refuses_bad_counts_and_preference_objectives():
    with pytest.raises(ConfigError, match="canaries: -1 must be between 0 and 256"):
        load_config(data="builtin:support", canaries=-1)
    with pytest.raises(ConfigError, match="canaries: planted in supervised answers"):
        load_config(data="builtin:support-prefs", objective="dpo", canaries=2)


@pytest.mark.usefixtures("one_thread")
def test_training_plants_in_a_copy_and_records_them(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl")
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    out = tmp_path / "run"
    config = load_config(model=str(model), data=str(data), out=str(out), max_steps=4, batch_size=4, rank=4,
                         progress=False, num_threads=1, canaries=3, val_fraction=0.1)
    train(config)
    assert hashlib.sha256(data.read_bytes()).hexdigest() == digest  # the user's file untouched
    record = json.loads((out / CANARY_FILE).read_text())
    assert [c["secret"] for c in record["canaries"]] == [c.secret for c in make_canaries(3, seed=0)]
    # 43 training examples, 16 read: each canary copied so that it is seen about 48 times
    assert record["copies"] == canary_copies(43, 16) == 129
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["train"]["n_in"] == 43 + 3 * 129  # tokenized with the planted copies
    assert summary["canaries"]["n"] == 3 and "never ship" in summary["canaries"]["note"]
    metadata = json.loads((out / "adapter" / "tailor_metadata.json").read_text())
    assert metadata["canaries"]["n"] == 3 and metadata["train_config"]["canaries"] == 3
    report = (out / "report.md").read_text()
    assert "Warning: 3 canaries planted" in report and CANARY_FILE in report
    from tailor.adapters import load_adapter
    from tailor.adapters.metadata import CanaryAdapterWarning
    from tailor.models import load_model

    base, _ = load_model(str(model), device="cpu", dtype=torch.bfloat16)
    with pytest.warns(CanaryAdapterWarning, match="never ship this adapter"):
        load_adapter(base, out / "adapter")  # serve, merge and export load it so: each says it
