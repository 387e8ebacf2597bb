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
