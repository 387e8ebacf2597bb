"""A short real run on the default model (SmolLM2-135M-Instruct) and the built-in dataset."""

from __future__ import annotations

import json
import math

import pytest

from tailor.train import load_config, train


@pytest.mark.slow
def test_short_real_run(tmp_path):
    out = tmp_path / "run"
    config = load_config(data="builtin:support", out=str(out), max_steps=3, batch_size=2, max_seq_len=256,
                         rank=8, lora_alpha=16, lr=1e-3, eval_batches=1, save_every=2, progress=False)
    train(config)
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", "report.md",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "checkpoints/step-000003"):
        assert (out / name).exists(), name
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in metrics) and "val_loss" in metrics[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["train"]["n_kept"] == summary["data"]["train"]["n_in"] > 1000
    assert 0 < summary["trainable_params"] < 0.1 * summary["total_params"]
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["base_model_name_or_path"] == "SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_short_real_run_with_kl_replay(tmp_path):
    """The demo's way of keeping general abilities on the real model: its own answers to the built-in
    prompts, generated (or read from the cache), mixed in, held to the base model's distribution."""
    from tailor.train.replay import REPLAY_PROMPTS

    out = tmp_path / "run"
    config = load_config(data="builtin:support", out=str(out), max_steps=3, batch_size=4, max_seq_len=256,
                         rank=8, lora_alpha=16, lr=1e-3, eval_batches=1, progress=False, replay_ratio=0.5,
                         replay_loss="kl", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    train(config)
    summary = json.loads((out / "summary.json").read_text())
    replay = summary["replay"]
    assert replay["prompts"] == len(REPLAY_PROMPTS) and replay["kept"] >= 0.9 * len(REPLAY_PROMPTS)
    assert replay["mixed_in"] == summary["data"]["train"]["n_in"] // 2  # half of what was trained on
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(math.isfinite(m["loss"]) and m["loss"] >= 0 for m in metrics)
