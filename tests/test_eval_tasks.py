"""A built-in task's metric in evaluation and comparison: `tailor eval` on a run trained on builtin:NAME
scores builtin:NAME:test with the task's metric; `tailor compare --recipe tasks` writes the methods x tasks
table with a decision per task (tiny models, real processes)."""

from __future__ import annotations

import json

import pytest
from conftest import save_tiny_run, tiny_model_dir

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
    save_tiny_run(tmp_path)
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


def test_tasks_table_and_decision_per_task():
    from tailor.compare.runner import decide
    from tailor.report.tasks import render_tasks_markdown, tasks_table

    few_shot = {"method": "few-shot", "retention": 1.0, "train_seconds": 0, "cost_usd": 0.0}
    rows = {"code": [{**few_shot, "score": 0.2},
                     {"method": "lora-r16", "score": 0.9, "retention": 0.9, "train_seconds": 60,
                      "cost_usd": 0.0167}],
            "voice": [{**few_shot, "score": 0.89}, {"method": "lora-r16", "error": "boom", "cost_usd": 0.0}]}
    result = {"tasks": {name: {"metric": get_task(name).metric, "methods": r, "decision": decide(r, 0.02)}
                        for name, r in rows.items()},
              "methods": ["few-shot", "lora-r16"], "eval_n": 30, "margin": 0.02, "wall_seconds": 90.0}
    assert tasks_table(result, "quality") == [["method", "code (pass_rate)", "voice (voice_pass_rate)"],
                                             ["few-shot", "0.200", "0.890"], ["lora-r16", "0.900", "error"]]
    assert tasks_table(result, "train_seconds")[2] == ["lora-r16", "60", "error"]
    markdown = render_tasks_markdown(result)
    assert "- **code**: lora-r16 reaches 0.900" in markdown
    assert "- **voice**: few-shot reaches 0.890" in markdown


@pytest.mark.slow
def test_compare_tasks_runs_every_method_on_every_task(tmp_path):
    from tailor.compare.presets import preset
    from tailor.compare.tasks import run_task_compare

    model = tiny_model_dir(tmp_path / "model")
    recipe = {k: v for k, v in preset("tasks-quick")["config"].items() if k != "replay_loss"}
    config = {**recipe, "model": str(model), "max_steps": 2, "batch_size": 2, "max_seq_len": 512,
              "replay_ratio": 0.0, "num_threads": 1, "overflow": "truncate"}
    with pytest.raises(ValueError, match="unknown built-in task 'poetry'"):
        run_task_compare(config, "few-shot,lora-r2", ["code", "poetry"], tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()  # refused before anything ran
    out = tmp_path / "tasks"
    result = run_task_compare(config, "zero-shot,lora-r2", ["code", "voice"], out, eval_n=2,
                              echo=lambda _: None)
    assert list(result["tasks"]) == ["code", "voice"] and result["methods"] == ["zero-shot", "lora-r2"]
    for name in ("code", "voice"):
        per_task = json.loads((out / name / "compare.json").read_text())
        assert per_task["eval_data"] == f"builtin:{name}:test"
        for row in per_task["methods"]:
            assert row.get("error") is None, row.get("error")
            assert row["score"] == 0.0  # a random tiny model writes neither working code nor the voice
            assert row["n"] == 2 and row["retention"] is not None
        assert (out / name / "lora-r2" / "run" / "config.yaml").read_text().count(f"builtin:{name}") == 1
    assert "## Decision per task" in (out / "tasks.md").read_text()
    assert json.loads((out / "tasks.json").read_text())["tasks"]["code"]["metric"] == "pass_rate"


def test_compare_recipe_tasks_refuses_a_bad_method_before_anything_runs(tmp_path):
    from typer.testing import CliRunner

    from tailor.cli import app

    out = tmp_path / "tasks"
    result = CliRunner().invoke(app, ["compare", "--recipe", "tasks-quick", "--methods", "few-shot,vera",
                                      "--out", str(out)])
    assert result.exit_code == 2 and "zero-shot, few-shot, full" in result.output
    assert not out.exists()
