"""A built-in task's metric in evaluation and comparison: `tailor eval` on a run trained on builtin:NAME
scores builtin:NAME:test with the task's metric; `tailor compare --recipe tasks` writes the methods x tasks
table with a decision per task (tiny models, real processes)."""

from __future__ import annotations

import json

import pytest
from conftest import chat_tokenizer, tiny_chat_llama, tiny_model_dir

from tailor.data import load_builtin
from tailor.data.tasks import get_task
from tailor.eval.run import DEFAULT_EVAL_DATA, default_eval_data, evaluate_run


def test_default_eval_data_follows_the_runs_builtin_task():
    assert default_eval_data({"data": "builtin:code"}) == "builtin:code:test"
    assert default_eval_data({"data": "builtin:voice:train"}) == "builtin:voice:test"
    assert default_eval_data({"data": "train.jsonl"}) == DEFAULT_EVAL_DATA == "builtin:support:test"
    assert default_eval_data({"data": [{"path": "builtin:code", "weight": 1}]}) == DEFAULT_EVAL_DATA
    assert default_eval_data({}) == DEFAULT_EVAL_DATA


@pytest.fixture
def voice_run(tmp_path):
    """A tiny chat model and a LoRA adapter in a run whose config trained on builtin:voice."""
    from tailor.adapters import save_adapter
    from tailor.lora import LoraConfig, add_lora

    tokenizer = chat_tokenizer()
    model = tiny_chat_llama(len(tokenizer), seed=4)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    add_lora(model, LoraConfig(r=2, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    save_adapter(model, tmp_path / "run" / "adapter")
    (tmp_path / "run" / "config.yaml").write_text(f"model: {tmp_path / 'model'}\ndata: builtin:voice\n"
                                                  "method: lora\nmax_seq_len: 512\n")
    return tmp_path


def test_eval_of_a_builtin_task_run_scores_its_test_split_with_the_task_metric(voice_run):
    result = evaluate_run(voice_run / "run", n=3, max_new_tokens=6, retention=False, dtype="float32")
    assert result["data"] == "builtin:voice:test"  # no --data: the test split of the task it trained on
    assert result["task"] == {"name": "voice", "metric": "voice_pass_rate"}
    test = load_builtin("voice", "test")[:3]
    assert [s["reference"] for s in result["samples"]] == [e.reference for e in test]
    for side in ("base", "tuned"):  # the task's own metric on the very answers each side gave
        expected = get_task("voice").score([s[side] for s in result["samples"]], test)
        assert result[side]["score"] == expected["score"]
        assert result[side]["task_details"]["violations"] == expected["violations"]
    assert result["base"]["field_accuracy"] is None  # not a JSON task: the support keys stay as they were
    written = json.loads((voice_run / "run" / "eval.json").read_text())
    assert written["tuned"]["score"] == result["tuned"]["score"] and written["task"]["name"] == "voice"
    assert "Task score (voice_pass_rate)" in (voice_run / "run" / "report.md").read_text()
