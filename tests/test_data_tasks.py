"""The built-in tasks (tailor.data.tasks): deterministic disjoint splits, each metric against hand-written
right and wrong answers, the code sandbox's limits, load_builtin and builtin specs, `tailor data list`."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from tailor.cli import app
from tailor.data import DataError, Example, load_builtin, load_examples
from tailor.data.tasks import SPLITS, TASKS, analysis, code, get_task, task_of_spec, voice
from tailor.data.tasks.sandbox import run_answers

NEW_TASKS = ("code", "analysis", "voice")


def _example(system: str, user: str, answer: str) -> Example:
    return Example(messages=[{"role": "system", "content": system}, {"role": "user", "content": user},
                             {"role": "assistant", "content": answer}], text=None, source="hand")


def test_registry_lists_four_tasks_with_their_contract():
    assert list(TASKS) == ["support", "code", "analysis", "voice"]
    assert {t.kind for t in TASKS.values()} == {"extraction", "code", "analysis", "rewriting"}
    for task in TASKS.values():
        assert task.split_sizes == {"train": 4000, "validation": 200, "test": 200}
        assert task.metric and task.description
    with pytest.raises(ValueError, match="unknown built-in task 'nope'; use one of: support, code, analysis, "
                                         "voice"):
        get_task("nope")
    assert task_of_spec("builtin:voice:test") is TASKS["voice"] and task_of_spec("data.jsonl") is None


@pytest.mark.parametrize("name", NEW_TASKS)
def test_generator_is_deterministic_and_splits_disjoint(name):
    task = get_task(name)
    splits = {split: task.build(split) for split in SPLITS}
    assert {s: len(e) for s, e in splits.items()} == task.split_sizes
    # the same call gives the same data
    assert [e.messages for e in task.build("test")] == [e.messages for e in splits["test"]]
    assert [e.messages for e in task.build("train", n=50)] == [e.messages for e in splits["train"][:50]]
    prompts = {s: [e.messages[1]["content"] for e in examples] for s, examples in splits.items()}
    for split, texts in prompts.items():
        assert len(set(texts)) == len(texts), split  # no prompt twice in a split
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["train"]) & set(prompts["validation"])
    assert not set(prompts["validation"]) & set(prompts["test"])
    for example in splits["test"]:
        assert [m["role"] for m in example.messages] == ["system", "user", "assistant"]
    assert len({e.messages[0]["content"] for e in splits["train"]}) == 1  # one fixed system prompt
    # the reference answers score 1, and answers that say nothing score 0
    test = splits["test"]
    assert task.score([e.reference for e in test], test)["score"] == 1.0
    assert task.score(["I am not sure." for _ in test], test)["score"] == 0.0


def test_answers_are_short_enough_to_learn():
    from tailor.models import DEFAULT_MODEL, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL)  # the default model's: what "short" means to it
    for name in NEW_TASKS:
        longest = max(len(tokenizer(e.reference).input_ids) for e in get_task(name).build("train", n=500))
        assert longest <= 80, (name, longest)


# --- code ------------------------------------------------------------------------------------------

PROMPT = "Write a Python function `count_char(text)` that returns how many times \"e\" occurs in text."


def test_code_hidden_tests_come_from_the_reference():
    name, tests = code.hidden_tests(PROMPT)
    assert name == "count_char" and len(tests) == code.N_TESTS
    assert all(expected == args[0].count("e") for args, expected in tests)  # a hand computation
    assert any(expected > 0 for _, expected in tests)  # the constant occurs in some inputs
    with pytest.raises(ValueError, match="not a prompt of the built-in code task"):
        code.hidden_tests("Write me a poem.")


@pytest.mark.parametrize(("answer", "passes"), [
    ('def count_char(text):\n    return text.count("e")', True),
    ('```python\ndef count_char(text):\n    return sum(c == "e" for c in text)\n```', True),  # fenced
    ('def count_char(text):\n    return text.count("a")', False),  # wrong constant
    ('def count(text):\n    return text.count("e")', False),  # wrong name
    ("def count_char(text):\n    while True:\n        pass", False),  # never ends
    ("def count_char(text)\n    return 1", False),  # syntax error
])
def test_code_metric_on_hand_written_answers(answer, passes):
    example = _example(code.SYSTEM_PROMPT, PROMPT, 'def count_char(text):\n    return text.count("e")')
    assert code.score([answer], [example])["score"] == float(passes)


def _one(source: str, tests=(([1], 2),), limit: float = 2.0) -> str:
    return run_answers([{"source": source, "function": "f", "tests": [list(t) for t in tests]}], limit)[0]


def test_sandbox_outcomes_and_limits(tmp_path):
    assert _one("def f(x):\n    return x + 1") == "passed"
    assert _one("def f(x):\n    return x") == "failed"
    assert _one("def f(x):\n    return True", tests=(([1], 1),)) == "failed"  # True is not 1 in JSON terms
    assert _one("def g(x):\n    return 2") == "no_function"
    assert _one("def f(x):\n    raise KeyError") == "error"
    started = time.perf_counter()
    assert _one("def f(x):\n    while True:\n        pass", limit=1.0) == "timeout"
    assert _one("def f(x):\n    import time\n    time.sleep(30)", limit=1.0) == "timeout"
    assert time.perf_counter() - started < 10
    # writes inside its own directory are allowed; outside it, refused (and nothing is written)
    assert _one("def f(x):\n    open('scratch.txt', 'w').write('ok')\n    return 2") == "passed"
    outside = tmp_path / "written.txt"
    assert _one(f"def f(x):\n    open({str(outside)!r}, 'w').write('x')\n    return 2") == "error"
    assert _one(f"def f(x):\n    import os\n    os.rename('a', {str(outside)!r})\n    return 2") == "error"
    assert not outside.exists()
    # no network, no subprocesses
    assert _one("import socket\ndef f(x):\n    return 2") == "error"
    assert _one("def f(x):\n    import urllib.request\n    urllib.request.urlopen('http://127.0.0.1:9')\n"
                "    return 2") == "error"
    marker = tmp_path / "ran.txt"
    assert _one(f"def f(x):\n    import os\n    os.system('touch {marker}')\n    return 2") == "error"
    assert _one("def f(x):\n    import subprocess\n    subprocess.run(['true'])\n    return 2") == "error"
    assert not marker.exists()


def test_sandbox_passes_every_reference_answer_of_the_test_split():
    test = code.build("test")  # (its speed: benchmarks/code_sandbox.py)
    assert code.score([e.reference for e in test], test)["outcomes"] == {"passed": 200}


def test_code_sandbox_benchmark_runs_end_to_end(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "code_sandbox.py"
    spec = importlib.util.spec_from_file_location("code_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--n", "3", "--json", str(tmp_path / "out.json")])
    assert result["n"] == 3 and json.loads((tmp_path / "out.json").read_text())["machine"]["threads"] >= 1


# --- analysis ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("prediction", "reference", "same"), [
    ("1200", "1200", True), ("1,200", "1200", True), ("1200.0", "1200", True), ("1200.", "1200", True),
    (" 42 ", "42", True), ("42.5", "42", False), ("The answer is 42", "42", False), ("", "42", False),
    ("ava", "Ava", True), ("\"Ava\"", "Ava", True), ("Ava.", "Ava", True), ("Ben", "Ava", False),
    ('["Ava", "Ben"]', '["Ava", "Ben"]', True), ('["Ben", "Ava"]', '["Ava", "Ben"]', False),
    ('["ava","ben"]', '["Ava", "Ben"]', True), ('{"max": 90.0, "min": 3}', '{"max": 90, "min": 3}', True),
    ('{"max": 90}', '{"max": 90, "min": 3}', False), ("not json", '["Ava"]', False),
])
def test_analysis_normalises_number_formatting(prediction, reference, same):
    assert analysis.same_answer(prediction, reference) is same


def test_analysis_answers_match_a_hand_computation():
    table = "Table:\nname,team,tickets\nAva,north,30\nBen,south,7\nCleo,north,19\n\nQuestion: "
    cases = {"What is the lowest tickets?": "7", "Which name has the highest tickets?": "Ava",
             "How many rows have team north?": "2"}
    examples = [_example(analysis.SYSTEM_PROMPT, table + q, a) for q, a in cases.items()]
    result = analysis.score(["7", "ava", "3"], examples)
    assert result["score"] == pytest.approx(2 / 3)
    # the generator's own references agree with a recomputation from the table
    for example in analysis.build("test", n=100):
        text = example.messages[1]["content"]
        rows = [line.split(",") for line in text.split("\n\n")[0].splitlines()[1:]]
        header, body = rows[0], rows[1:]
        question = text.rsplit("Question: ", 1)[1]
        if question.startswith("What is the highest "):
            column = header.index(question.removeprefix("What is the highest ").rstrip("?"))
            assert int(example.reference) == max(int(r[column]) for r in body)


# --- voice -------------------------------------------------------------------------------------------

GOOD = f"{voice.GREETING} Your order ORD-12345 is on its way and should reach you on 4 May. {voice.SIGN_OFF}"


@pytest.mark.parametrize(("text", "rule"), [
    (GOOD.replace(voice.GREETING, "Hi."), "does not start with"),
    (GOOD.replace(voice.SIGN_OFF, "Bye."), "does not end with"),
    (GOOD.replace("on its way", "on its way!"), "exclamation mark"),
    (GOOD.replace("on its way", "on its way NOW"), "capitals: NOW"),
    (GOOD.replace("Your order", "The order").replace("reach you", "arrive"),
     "does not speak to the customer"),
    (GOOD.replace("should reach you", "should reach the customer"), "third person"),
    (GOOD.replace("on its way", "on its way " + "and then " * 30), "words, more than 60"),
])
def test_voice_rules_each_caught(text, rule):
    problems = voice.voice_violations(text)
    assert len(problems) == 1 and rule in problems[0], problems


def test_voice_metric_needs_rules_and_facts():
    assert voice.voice_violations(GOOD) == []  # ORD-12345 is an id, not shouting
    notice = "Order ORD-12345 shipped. Delivery expected 4 May."
    example = _example(voice.SYSTEM_PROMPT, notice, GOOD)
    assert voice.score([GOOD], [example])["score"] == 1.0
    dropped_date = GOOD.replace("on 4 May", "soon")
    result = voice.score([dropped_date, GOOD.replace("!", "") + "!"], [example, example])
    assert result["score"] == 0.0 and result["facts_kept"] == 0.5 and result["rules_kept"] == 0.5
    assert voice.missing_facts("Refund of $12.50 for ORD-11111 on 3 June.", "ORD-11111, 3 June") == ["$12.50"]


# --- specs, load_builtin, CLI ------------------------------------------------------------------------

def test_load_builtin_and_specs():
    loaded = load_examples("builtin:voice:test")
    assert [e.messages for e in load_builtin("voice", "test")] == [e.messages for e in loaded]
    assert len(load_examples("builtin:analysis")) == 4000  # the train split
    assert load_examples("builtin:code:validation")[0].source == "builtin:code:validation:1"
    with pytest.raises(ValueError, match="unknown split 'dev'.*train, validation, test"):
        load_builtin("code", "dev")
    for bad in ("builtin:nope", "builtin:code:dev", "builtin:code:test:1"):
        with pytest.raises(DataError) as error:
            load_examples(bad)
        for spec in ("builtin:support", "builtin:code:test", "builtin:analysis:validation", "builtin:voice"):
            assert spec in str(error.value)


def test_data_source_sha256_of_a_builtin_task():
    from tailor.data.sources import data_record

    examples = (load_builtin("code", "train")[:20], load_builtin("code", "validation")[:5])
    first, again = data_record("builtin:code", None, examples), data_record("builtin:code", None, examples)
    voice_examples = (load_builtin("voice")[:20], load_builtin("voice", "validation")[:5])
    other = data_record("builtin:voice", None, voice_examples)
    assert first["sha256"] == again["sha256"] != other["sha256"]
    assert first["sources"][0]["spec"] == "builtin:code" and first["sources"][0]["examples"] == 25


def test_data_list_cli():
    result = CliRunner().invoke(app, ["data", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == ["support", "code", "analysis", "voice"]
    sizes = {"train": 4000, "validation": 200, "test": 200}
    assert rows[1] == {"name": "code", "kind": "code", "sizes": sizes, "metric": "pass_rate",
                       "description": TASKS["code"].description}
    table = CliRunner().invoke(app, ["data", "list"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "voice_pass_rate" in table.output and "4000/200/200" in table.output
