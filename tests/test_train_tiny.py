"""`train(config)` end to end on a tiny Llama saved to disk with a character-level ChatML tokenizer.

The helpers (tiny_model_dir, write_arithmetic_jsonl) live in conftest: the resume and CLI tests use them too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import VOCAB, tiny_model_dir, write_arithmetic_jsonl

from tailor.train import load_config, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def test_tokenizer_round_trip(tiny_dir):
    from tailor.models import load_model

    model, tokenizer = load_model(str(tiny_dir), device="cpu")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "add 1 2"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < VOCAB and tokenizer.decode(ids) == text
    assert tokenizer.pad_token_id == model.config.eos_token_id


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_lora_run_directory(tiny_dir, tmp_path, precision):
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    config = load_config(model=str(tiny_dir), data=str(data), out=str(out), max_steps=12, batch_size=8,
                         rank=4, lora_alpha=8, lr=5e-3, eval_every=6, save_every=6, progress=False,
                         precision=precision, num_threads=1)
    assert train(config) == out
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", "report.md",
                 "checkpoints/step-000012", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).exists(), name
    # the resolved config reloads to the same thing (base_dtype auto resolved for the precision)
    from tailor.names import BASE_DTYPE_AT_FP32

    stored = "bf16" if precision == "bf16" else BASE_DTYPE_AT_FP32
    assert load_config(out / "config.yaml") == config.replace(base_dtype=stored)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["tokens_per_s"] > 0
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["data"]["train"]["n_kept"] == 43 and summary["data"]["validation"]["n_kept"] == 5
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [6, 12]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    report = (out / "report.md").read_text()
    assert "tokens/s" in report and "Trainable parameters" in report
    # the plan of this very run (tailor plan's estimate on this device) beside the measured peak
    from tailor.plan.planner import planned_peak_gib

    assert summary["planned_peak_gib"] == round(planned_peak_gib(config, "cpu", str(tiny_dir)), 3)
    assert summary["peak_rss_gib"] == round(summary["peak_rss_mib"] / 1024, 3)
    assert f"{summary['planned_peak_gib']:.2f} GiB; measured {summary['peak_rss_gib']:.2f} GiB" in report

    from tailor.adapters import load_adapter
    from tailor.models import load_model

    model, _ = load_model(str(tiny_dir), device="cpu")
    load_adapter(model, out / "adapter")  # the deliverable loads back onto the base model


def test_full_fine_tune_saves_model(tiny_dir, tmp_path):
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    config = load_config(model=str(tiny_dir), data=str(data), out=str(out), method="full", max_steps=3,
                         batch_size=8, lr=1e-3, progress=False, num_threads=1)
    train(config)
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer_config.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == summary["total_params"]


def test_existing_run_refused_without_resume(tiny_dir, tmp_path):
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl", n=16)
    config = load_config(model=str(tiny_dir), data=str(data), out=str(tmp_path / "run"), max_steps=1,
                         batch_size=4, progress=False, num_threads=1)
    train(config)
    with pytest.raises(ValueError, match="--resume"):
        train(config)


def test_demo_evaluation_writes_eval_json_and_report(tiny_dir, tmp_path):
    from tailor.eval import evaluate_run

    data = write_arithmetic_jsonl(tmp_path / "train.jsonl", n=16)
    out = tmp_path / "run"
    train(load_config(model=str(tiny_dir), data=str(data), out=str(out), max_steps=2, batch_size=4, rank=2,
                      progress=False, num_threads=1, max_seq_len=512))
    # retention off: 114 general prompts take minutes with a tiny model that never stops (test_eval covers it)
    result = evaluate_run(out, n=3, batch_size=3, retention=False)
    saved = json.loads((out / "eval.json").read_text())
    assert saved["n"] == result["n"] == 3
    for side in ("base", "tuned"):
        for key in ("field_accuracy", "exact_match", "val_loss"):
            assert isinstance(saved[side][key], float), (side, key)
    report = (out / "report.md").read_text()
    assert "## Base vs tuned" in report and "Per-field accuracy" in report
