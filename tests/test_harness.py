"""lm-evaluation-harness through `tailor serve`: a small local multiple-choice task (tests/harness/, read
from its JSONL, no hub) scored by lm-eval's `local-completions` against a real tailor server equals lm-eval's
own HF backend on the same model; `tailor eval --harness` writes base vs tuned into eval.json and the
report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model_dir
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from tailor.adapters.format import save_adapter
from tailor.lora import LoraConfig, add_lora, lora_layers

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the [harness] extra")

TASK = Path(__file__).parent / "harness" / "tailor_mc.yaml"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
def test_local_completions_against_tailor_serve_equals_lm_evals_hf_backend(offline):
    from tailor.eval.harness import parse_tasks, run_lm_eval, serving
    from tailor.models import DEFAULT_MODEL
    from tailor.models.load import resolve_model
    from tailor.serve.server import build_server

    directory = resolve_model(DEFAULT_MODEL).directory  # the default model's HF form (safetensors)
    tasks = parse_tasks(str(TASK))
    app = build_server(DEFAULT_MODEL, dtype="float32", max_batch=8)
    with serving(app) as url:
        served = run_lm_eval(url, DEFAULT_MODEL, directory, tasks, batch_size=4,
                             max_length=app.state.engine.max_model_len)
    own = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(directory), "dtype": "float32",
                                                          "device": "cpu"},
                                  tasks=tasks, batch_size=8, log_samples=False)["results"]
    n = sum(1 for _ in (TASK.parent / "tailor_mc.jsonl").open())
    assert own["tailor_mc"]["sample_len"] == served["tailor_mc"]["sample_len"] == n >= 20
    assert served["tailor_mc"]["acc"] == pytest.approx(own["tailor_mc"]["acc,none"], abs=0.01)
    assert served["tailor_mc"]["acc_norm"] == pytest.approx(own["tailor_mc"]["acc_norm,none"], abs=0.01)
    assert served["tailor_mc"]["acc"] > 0.3  # above chance (0.25): a real model answering real questions


def test_tailor_eval_harness_writes_base_and_tuned(tmp_path, offline):
    """The command on a run directory (a tiny model and an adapter that changes its answers): eval.json gains
    a "harness" entry beside what it held, and report.md its table."""
    from tailor.cli import app

    model_dir = tiny_model_dir(tmp_path / "model")
    run = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            weight = layer.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=generator))
    save_adapter(model, run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(model_dir), "method": "lora"}))
    (run / "eval.json").write_text(json.dumps({"n": 3, "note": "kept"}))

    result = CliRunner().invoke(app, ["eval", str(run), "--harness", str(TASK), "--n", "6", "--dtype",
                                      "float32", "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    written = json.loads((run / "eval.json").read_text())
    assert written["note"] == "kept"
    harness = written["harness"]
    assert harness["tasks"] == ["tailor_mc"] and harness["limit"] == 6
    for side in ("base", "tuned"):
        acc = harness[side]["tailor_mc"]["acc"]
        assert 0 <= acc <= 1 and acc * 6 == pytest.approx(round(acc * 6))  # a share of 6 questions
        assert harness[side]["tailor_mc"]["higher_is_better"]["acc"] is True
    assert "## lm-evaluation-harness" in (run / "report.md").read_text()
    assert "tailor_mc" in result.output


def test_task_files_and_their_mistakes(tmp_path):
    from tailor.eval.harness import parse_tasks

    (config,) = parse_tasks(str(TASK))
    assert Path(config["dataset_kwargs"]["data_files"]["test"]) == (TASK.parent / "tailor_mc.jsonl").resolve()
    assert parse_tasks("hellaswag, arc_easy") == ["hellaswag", "arc_easy"]
    (tmp_path / "nameless.yaml").write_text("dataset_path: json\n")
    for spec, message in (("", "at least one task"), (str(tmp_path / "missing.yaml"), "no such task file"),
                          (str(tmp_path / "nameless.yaml"), "no `task:` name")):
        with pytest.raises(ValueError, match=message):
            parse_tasks(spec)


def test_local_chat_completions_generation_task_scores_what_hf_generate_answers(tmp_path, offline):
    """lm-eval's local-chat-completions (generate_until, the chat template applied by the server) against
    tailor serve: a task whose targets are HF generate's greedy answers for half the questions (and
    wrong for the rest) scores exact_match 0.5."""
    from transformers import AutoTokenizer

    from tailor.eval.harness import serving
    from tailor.serve.sampling import stop_token_ids
    from tailor.serve.server import build_server

    model_dir = tiny_model_dir(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stops = stop_token_ids(model, tokenizer)
    questions = ["add 1 2", "where is it?", "hello", "what now", "ok then", "the end"]
    rows = []
    for i, question in enumerate(questions):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        out = out[: next((k for k, t in enumerate(out) if t in stops), len(out))]
        answer = tokenizer.decode(out, skip_special_tokens=True).split("|")[0]  # "|": the stop string
        rows.append({"question": question, "target": answer if i % 2 == 0 else answer + "-wrong"})
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sum(bool(r["target"]) for r in rows[::2]) >= 2  # real answers to match, not empty strings
    task = {"task": "tailor_gen", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
            "output_type": "generate_until", "doc_to_text": "{{question}}",
            "doc_to_target": "{{target}}", "generation_kwargs": {"until": ["|"], "max_gen_toks": 6},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}
    app = build_server(str(model_dir), dtype="float32")
    with serving(app) as url:
        results = lm_eval.simple_evaluate(
            model="local-chat-completions", apply_chat_template=True, tasks=[task], log_samples=False,
            model_args={"base_url": f"{url}/v1/chat/completions", "model": str(model_dir), "max_retries": 1})
    assert results["results"]["tailor_gen"]["exact_match,none"] == pytest.approx(0.5)
