"""`tailor train` / `tailor demo` command lines."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model_dir, write_arithmetic_jsonl
from typer.testing import CliRunner

from tailor.cli import app

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def test_help_lists_the_interface():
    result = runner.invoke(app, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for flag in ("--model", "--data", "--val-data", "--out", "--max-steps", "--rank", "--lora-alpha",
                 "--target-modules", "--lr", "--batch-size", "--resume", "--set"):
        assert flag in result.output
    assert runner.invoke(app, ["demo", "--help"]).exit_code == 0


def test_bad_config_is_one_clear_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data: x.jsonl\nrnak: 4\n")
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 2
    assert "unknown key 'rnak'" in result.output and "did you mean 'rank'" in result.output
    assert "Traceback" not in result.output


def test_missing_data_file_is_a_clear_error(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    result = runner.invoke(app, ["train", "--model", str(model_dir), "--data", str(tmp_path / "nope.jsonl"),
                                 "--out", str(tmp_path / "run"), "--set", "progress=false"])
    assert result.exit_code == 2
    assert "nope.jsonl" in result.output and "Traceback" not in result.output


def test_flags_override_yaml_and_run(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl", n=24)
    val = write_arithmetic_jsonl(tmp_path / "val.jsonl", n=8, offset=100)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {model_dir}\ndata: {data}\nrank: 2\nmax_steps: 50\nprogress: false\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(config), "--val-data", str(val), "--out", str(out),
                                 "--max-steps", "2", "--rank", "4", "--lora-alpha", "4", "--lr", "1e-3",
                                 "--batch-size", "4", "--target-modules", "q_proj,v_proj",
                                 "--set", "num_threads=1"])
    assert result.exit_code == 0, result.output
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["data"]["validation"]["n_kept"] == 8


def test_pissa_loraplus_8bit_run_delivers_a_lora_for_the_original_base(tmp_path):
    """The flags reach the run: the adapter is saved converted (rank 2r, loads in PEFT on the original base),
    report.md says so, the optimizer checkpointed is bitsandbytes' with LoRA+'s groups."""
    import torch
    from transformers import AutoModelForCausalLM

    peft = pytest.importorskip("peft")
    model_dir = tiny_model_dir(tmp_path / "model")
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl", n=24)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out),
                                 "--max-steps", "3", "--rank", "4", "--lora-alpha", "8", "--batch-size", "4",
                                 "--init-lora-weights", "pissa", "--loraplus-lr-ratio", "16",
                                 "--optimizer", "adamw-8bit", "--save-every", "3",
                                 "--set", "num_threads=1", "--set", "progress=false"])
    assert result.exit_code == 0, result.output
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16
    assert adapter_config["init_lora_weights"] is True
    report = (out / "report.md").read_text()
    assert "## Saved for the original base" in report and "rank 4 -> 8" in report
    assert "`pissa`" in report and "`adamw-8bit`" in report
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, out / "adapter")
    q_proj = loaded.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A["default"].weight.shape == (8, base.config.hidden_size)
    saved = torch.load(out / "checkpoints" / "step-000003" / "optimizer.pt", weights_only=True)
    assert sorted({g["lr_scale"] for g in saved["param_groups"]}) == [1.0, 16.0]


def test_pissa_on_a_quantized_base_is_refused_before_any_work(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "missing.jsonl"), "--out", str(out),
                                 "--method", "qlora-nf4", "--init-lora-weights", "olora",
                                 "--optimizer", "adam8"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "qlora-nf4 keeps them quantized" in result.output
    assert "adamw, adamw-8bit, paged-adamw-8bit" in result.output
    assert not out.exists()
