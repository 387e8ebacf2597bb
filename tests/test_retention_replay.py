"""Keeping general abilities: the retention set, replay of the base model's own answers, off-task answers."""

from __future__ import annotations

import difflib
import json
import re

import pytest
from conftest import chat_tokenizer, tiny_model_dir

from tailor.data import IGNORE_INDEX, Example, load_examples, tokenize_examples
from tailor.eval.retention import KINDS, RETENTION_ITEMS, RetentionItem, off_task
from tailor.eval.structured import in_task_format, task_fields
from tailor.train.replay import REPLAY_PROMPTS, mix_replay, replay_examples

SUPPORT_FIELDS = ("intent", "order_id", "product", "urgency", "sentiment")


def _normal(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


# ----- the retention set ---------------------------------------------------------------------------------


def test_retention_set_has_a_hundred_checked_prompts_of_every_kind():
    assert len(RETENTION_ITEMS) >= 100
    per_kind = {kind: sum(item.kind == kind for item in RETENTION_ITEMS) for kind in KINDS}
    assert set(per_kind) == {"fact", "arithmetic", "instruction", "writing", "code"}
    assert min(per_kind.values()) >= 10, per_kind
    assert len({_normal(item.prompt) for item in RETENTION_ITEMS}) == len(RETENTION_ITEMS)  # no repeats
    for item in RETENTION_ITEMS:
        re.compile(item.pattern)


def test_retention_checks_are_not_passed_by_echoes_or_task_answers():
    """A check that the question itself, an empty answer, or a support ticket's JSON passes would count
    an adapter that echoes or answers everything as a ticket as retained."""
    tickets = [e.reference for e in load_examples("builtin:support:test")[:100]]
    for item in RETENTION_ITEMS:
        assert not item.is_correct(item.prompt), item.prompt
        assert not item.is_correct(""), item.prompt
        passed = [t for t in tickets if item.is_correct(t)]
        assert not passed, (item.prompt, passed[:1])


def test_retention_check_reads_answers_case_insensitively_with_scoped_case():
    assert RetentionItem("fact", "Capital of France?", r"\bparis\b").is_correct("It is PARIS.")
    upper = next(i for i in RETENTION_ITEMS if i.prompt == "Convert 'hello world' to uppercase.")
    assert upper.is_correct("HELLO WORLD") and not upper.is_correct("hello world")
    writing = next(i for i in RETENTION_ITEMS if i.prompt == "Write a sentence about a cat.")
    assert writing.is_correct("The cat sleeps on the warm windowsill.") and not writing.is_correct("A cat.")


def test_replay_prompts_are_disjoint_from_the_retention_set():
    retention = {_normal(item.prompt) for item in RETENTION_ITEMS}
    replay = [_normal(prompt) for prompt in REPLAY_PROMPTS]
    assert len(replay) == len(set(replay)) >= 50
    assert not retention & set(replay)
    near = [(a, b) for a in replay for b in retention if difflib.SequenceMatcher(None, a, b).ratio() > 0.85]
    assert not near


# ----- replay --------------------------------------------------------------------------------------------


def _chat(i: int, answer: str = "ok") -> Example:
    return Example([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": answer}], None,
                   f"t:{i}")


def test_mix_replay_gives_the_asked_share_of_replayed_examples():
    train = [_chat(i) for i in range(90)]
    replay = [_chat(100 + i, "base answer") for i in range(7)]
    mixed = mix_replay(train, replay, 0.25)
    replayed = mixed[90:]
    assert len(mixed) == 120 and len(replayed) == 30  # 30 / 120 = 0.25
    assert mixed[:90] == train
    assert {e.source for e in replayed} == {e.source for e in replay}  # every replayed answer used, in turn
    assert mix_replay(train, replay, 0.0) == train
    assert len(mix_replay(train, replay, 0.1)) - 90 == 10  # 10 / 100
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        mix_replay(train, replay, 1.0)
    with pytest.raises(ValueError, match="no replayed answer"):
        mix_replay(train, [], 0.2)


def test_replayed_answers_carry_the_loss_and_their_prompts_do_not():
    tokenizer = chat_tokenizer()
    example = Example([{"role": "user", "content": "Write two sentences describing a lighthouse."},
                       {"role": "assistant", "content": "A tall white tower."}], None, "replay:0")
    (tokenized,), _ = tokenize_examples([example], tokenizer, max_seq_len=256)
    supervised = [t for t, label in zip(tokenized.input_ids, tokenized.labels, strict=True)
                  if label != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "A tall white tower.<|im_end|>"


def test_replay_answers_are_generated_once_then_read_from_the_cache(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    prompts = ("Say hi.", "Name a color.")
    examples, record = replay_examples(str(model_dir), prompts, max_new_tokens=3, cache_dir=tmp_path / "c")
    assert not record["reused"] and record["prompts"] == 2
    cache = tmp_path / "c" / record["cache"].rsplit("/", 1)[1]
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == list(prompts)
    assert len(examples) == sum(r["finished"] and bool(r["answer"]) for r in rows)  # cut answers left out

    # the second call reads the file (an edited answer comes back) instead of generating again
    cache.write_text("".join(json.dumps({**r, "answer": f"cached {i}", "finished": True}) + "\n"
                             for i, r in enumerate(rows)))
    again, record = replay_examples(str(model_dir), prompts, max_new_tokens=3, cache_dir=tmp_path / "c")
    assert record["reused"] and [e.reference for e in again] == ["cached 0", "cached 1"]
    assert [e.messages[0]["content"] for e in again] == list(prompts)
    # other prompts or settings: another cache entry
    _, other = replay_examples(str(model_dir), prompts, max_new_tokens=4, cache_dir=tmp_path / "c")
    assert not other["reused"] and other["cache"] != record["cache"]


def test_training_with_replay_mixes_the_cached_base_answers_in(tmp_path, monkeypatch):
    from conftest import write_arithmetic_jsonl

    from tailor.models import load_model, parse_dtype
    from tailor.train import load_config, train
    from tailor.train.replay import REPLAY_MAX_NEW_TOKENS, replay_cache_file

    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_model_dir(tmp_path / "model")
    model, _ = load_model(str(model_dir), dtype=parse_dtype("auto"))
    # answers cached before (a random tiny model would rarely end its turn): two finished, the rest cut
    cache = replay_cache_file(model, REPLAY_PROMPTS, REPLAY_MAX_NEW_TOKENS)
    cache.parent.mkdir(parents=True)
    cache.write_text("".join(json.dumps({"prompt": p, "answer": f"answer {i}", "finished": i < 2}) + "\n"
                             for i, p in enumerate(REPLAY_PROMPTS)))
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl", n=40)
    config = load_config(model=str(model_dir), data=str(data), out=str(tmp_path / "run"), max_steps=1,
                         batch_size=4, rank=2, progress=False, num_threads=1, replay_ratio=0.2)
    run = train(config)
    replay = json.loads((run / "summary.json").read_text())["replay"]
    assert replay["reused"] and replay["kept"] == 2 and replay["prompts"] == len(REPLAY_PROMPTS)
    assert replay["ratio"] == 0.2 and replay["mixed_in"] == 9  # 36 training examples + 9 = 45: 9 / 45 = 0.2
    assert json.loads((run / "summary.json").read_text())["data"]["train"]["n_in"] == 45

    # the user's own prompts, from a file, are answered and replayed instead
    prompts = ("Name a river in Africa.", "Write a limerick about a goat.")
    (tmp_path / "mine.txt").write_text("\n".join(prompts))
    replay_cache_file(model, prompts, REPLAY_MAX_NEW_TOKENS).write_text(
        "".join(json.dumps({"prompt": p, "answer": "ok", "finished": True}) + "\n" for p in prompts))
    config = load_config(model=str(model_dir), data=str(data), out=str(tmp_path / "mine"), max_steps=1,
                         batch_size=4, rank=2, progress=False, num_threads=1, replay_ratio=0.2,
                         replay_prompts=str(tmp_path / "mine.txt"), replay_loss="kl")
    replay = json.loads((train(config) / "summary.json").read_text())["replay"]
    assert replay["reused"] and replay["prompts"] == 2 and replay["kept"] == 2


# ----- the off-task check --------------------------------------------------------------------------------


def test_off_task_counts_general_answers_in_the_task_shape():
    fields = task_fields(['{"intent":"refund","order_id":null}', '{"intent":"other","product":"mug"}'])
    assert fields == ("intent", "order_id", "product")
    assert task_fields(["Paris", '{"a": 1}']) is None  # not a JSON task: no shape to recognise
    assert in_task_format('{"capital":"France","intent":"answer","data":"capital":', fields)  # broken JSON
    assert in_task_format('Sure: {"intent": "other"}', fields)  # an object with a task field
    assert not in_task_format('Use a dict: {"a": 1}', fields)  # an object, but not the task's
    assert not in_task_format("The capital of France is Paris.", fields)
    retention = {"items": [{"answer": '{"intent":"other","order_id":null,"product":null}'},
                           {"answer": "Paris"}, {"answer": 'x = {"a": 1}'}, {"answer": "4"}]}
    assert off_task(retention, fields) == {"n": 4, "count": 1, "rate": 0.25, "fields": list(fields)}


def test_replay_prompts_from_a_file_skip_blanks_and_comments_and_refuse_retention_prompts(tmp_path):
    from tailor.data import DataError
    from tailor.train.replay import load_replay_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("# general prompts\nName a river in Africa.\n\n  Write a limerick about a goat.  \n")
    assert load_replay_prompts(path) == ("Name a river in Africa.", "Write a limerick about a goat.")
    path.write_text("Name a river in Africa.\nwhat is the capital of France\n")
    with pytest.raises(DataError, match=r"prompts.txt:2: 'what is the capital of France' is a prompt of the "
                                        r"retention set.*Fix: remove the line"):
        load_replay_prompts(path)
    path.write_text("# nothing\n\n")
    with pytest.raises(DataError, match="holds no prompt"):
        load_replay_prompts(path)
    with pytest.raises(DataError, match="missing.txt: cannot be read"):
        load_replay_prompts(tmp_path / "missing.txt")


def test_training_refuses_a_bad_replay_prompt_file_before_loading_the_model(tmp_path):
    from tailor.config import ConfigError
    from tailor.data import DataError
    from tailor.train import load_config, train

    with pytest.raises(ConfigError, match="replay_prompts: given, and replay_ratio is 0"):
        load_config(data="builtin:support", replay_prompts="p.txt")
    (tmp_path / "p.txt").write_text("What is 2 + 2?\n")
    config = load_config(model=str(tmp_path / "no-model"), data="builtin:support", out=str(tmp_path / "run"),
                         replay_ratio=0.2, replay_prompts=str(tmp_path / "p.txt"))
    with pytest.raises(DataError, match="p.txt:1: 'What is 2 \\+ 2\\?' is a prompt of the retention set"):
        train(config)
    assert not (tmp_path / "run").exists()
