"""report.md from the files of a run directory."""

from __future__ import annotations

import json

from tailor.config import TrainConfig, save_config
from tailor.report import render_report, write_report


def _run_dir(tmp_path, with_eval: bool):
    save_config(TrainConfig(data="builtin:support", rank=16, name="demo"), tmp_path / "config.yaml")
    summary = {"data": {"train": {"n_in": 10, "n_kept": 9, "n_truncated": 1, "n_dropped": 1, "n_tokens": 900,
                                  "n_supervised_tokens": 300}, "validation": None},
               "steps": 5, "train_seconds": 12.5, "tokens_per_s": 72.0, "tokens": 900,
               "supervised_tokens": 300,
               "final_train_loss": 0.5, "final_val_loss": 0.6, "best_val_loss": None, "best_step": None,
               "final_weights": "last", "trainable_params": 1000, "total_params": 100000,
               "weights_dir": "adapter",
               "weights_bytes": 4_300_000, "peak_rss_mib": 812.0, "device": "cpu", "num_threads": 2}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    if with_eval:
        side = {"n": 4, "field_accuracy": 0.25, "exact_match": 0.0, "json_valid": 0.5, "val_loss": 2.0,
                "per_field": {"intent": 0.5, "urgency": 0.0}}
        tuned = {**side, "field_accuracy": 0.95, "exact_match": 0.75, "val_loss": 0.1,
                 "per_field": {"intent": 1.0, "urgency": 0.9}}
        evaluation = {"n": 4, "base": side, "tuned": tuned,
                      "retention": {"base": {"n": 10, "correct": 10, "accuracy": 1.0},
                                    "tuned": {"n": 10, "correct": 9, "accuracy": 0.9}},
                      "samples": [{"prompt": "Where is ORD-12345?", "reference": '{"intent":"order_status"}',
                                   "base": "Sure! I can help.", "tuned": '{"intent":"order_status"}'}]}
        (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    return tmp_path


def test_report_without_eval(tmp_path):
    text = render_report(_run_dir(tmp_path, with_eval=False))
    assert text.startswith("# tailor run: demo")
    assert "| rank | `16` |" in text
    assert "| train | 10 | 9 | 1 | 1 | 900 | 300 |" in text
    assert "72 tokens/s" in text and "1,000 (1.00% of 100,000)" in text and "4.1 MiB" in text
    assert "Base vs tuned" not in text
    assert "replay_loss" not in text  # no replay in this run


def test_report_names_the_replay(tmp_path):
    run = _run_dir(tmp_path, with_eval=False)
    save_config(TrainConfig(data="builtin:support", name="demo", replay_ratio=0.4, replay_loss="kl"),
                run / "config.yaml")
    summary = json.loads((run / "summary.json").read_text())
    summary["replay"] = {"prompts": 168, "kept": 159, "reused": True, "ratio": 0.4, "mixed_in": 6}
    (run / "summary.json").write_text(json.dumps(summary))
    text = render_report(run)
    assert "| replay_ratio | `0.400` |" in text and "| replay_loss | `kl` |" in text
    assert "| replay_prompts | `built-in`: 159 of 168 answers kept |" in text


def test_report_with_eval(tmp_path):
    path = write_report(_run_dir(tmp_path, with_eval=True))
    text = path.read_text()
    assert "| Per-field accuracy | 0.250 | 0.950 | +0.700 |" in text
    assert "| urgency | 0.000 | 0.900 |" in text
    assert "| tuned | 9/10 | 0.900 |" in text
    assert "Where is ORD-12345?" in text and "Sure! I can help." in text
    assert not list(tmp_path.glob("*.tmp"))
