"""One vocabulary: advise writes a TrainConfig YAML, train runs it, plan plans it (flags override)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tailor.cli import app
from tailor.config import field_names, load_config
from tailor.names import DEFAULT_MODEL

runner = CliRunner()


def _invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def _plan_json(*args: str) -> dict:
    """The plan for a GPU run (what advise's recipes are for); `tailor plan` plans this machine's device
    when --device is left out."""
    return json.loads(_invoke("plan", *args, "--device", "cuda", "--json"))


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("args", "method"),
    [
        ((), "lora"),  # the acceptance recipe: the default model on 24 GB
        (("--model", "Llama-3.1-8B", "--gpu-memory", "12"), "qlora-nf4"),
        (("--examples", "200000", "--large-shift", "--gpu-memory", "80"), "full"),
    ],
)
def test_every_key_advise_writes_is_a_train_config_field_and_loads(tmp_path, args, method):
    out = tmp_path / "r.yaml"
    argv = ["advise", "--examples", "2000", "--gpu-memory", "24", *args, "--out", str(out)]
    screen = _invoke(*argv)
    assert f"wrote the recipe to {out}" in screen
    recipe = yaml.safe_load(out.read_text())
    assert recipe["method"] == method
    assert set(recipe) <= set(field_names())
    for key in recipe:  # the screen shows the same names
        assert f"  {key}: " in screen, key
    config = load_config(out, data="builtin:support")  # train's own validation
    assert config.method == method and config.lr == recipe["lr"]
    if "--model" not in args:
        assert config.model == DEFAULT_MODEL  # trains as is: the model `tailor train` loads by default
    # JSON mode keeps stdout valid JSON (the "wrote" line goes to stderr) and uses the same keys
    result = runner.invoke(app, [*argv[:-1], str(tmp_path / "r2.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["recipe"] == recipe
    assert (tmp_path / "r2.yaml").read_text() == out.read_text()


def test_advise_without_a_recipe_refuses_out(tmp_path):
    out = tmp_path / "r.yaml"
    result = runner.invoke(app, ["advise", "--prompting-works", "--out", str(out)])
    assert result.exit_code == 2 and "no recipe" in result.output and not out.exists()


def test_plan_of_advise_recipe_equals_flags_and_the_advised_peak(tmp_path):
    out = tmp_path / "r.yaml"
    advice = json.loads(_invoke("advise", "--examples", "2000", "--gpu-memory", "24", "--json", "--out",
                                str(out)))
    r = advice["recipe"]
    from_yaml = _plan_json(str(out))
    from_flags = _plan_json(
        "--model", r["model"], "--method", r["method"], "--rank", str(r["rank"]),
        "--lora-alpha", str(r["lora_alpha"]), "--target-modules", r["target_modules"],
        "--batch-size", str(r["batch_size"]), "--max-seq-len", str(r["max_seq_len"]),
        "--grad-accum", str(r["grad_accum"]), "--gradient-checkpointing", "--precision", "bf16",
        "--adapter-dtype", "fp32", "--lora-dropout", "0", "--loss-chunk-tokens", "1024",
    )
    assert from_yaml == from_flags
    assert from_yaml["memory_gib"]["total"] == pytest.approx(advice["planned_peak_gib"])
    assert _invoke("plan", str(out)).count("lora_alpha=32") == 1  # the tables render too


_CONFIG = """\
model: SmolLM2-360M
method: lora
rank: 8
lora_alpha: 16
target_modules: [q_proj, v_proj]
batch_size: 2
max_seq_len: 256
grad_accum: 4
gradient_checkpointing: true
lora_dropout: 0.05
precision: bf16
loss_chunk_size: 512
"""

_EQUIVALENT_FLAGS = (
    "--model", "SmolLM2-360M", "--method", "lora", "--rank", "8", "--lora-alpha", "16",
    "--target-modules", "q_proj,v_proj", "--batch-size", "2", "--max-seq-len", "256", "--grad-accum", "4",
    "--gradient-checkpointing", "--lora-dropout", "0.05", "--precision", "bf16", "--adapter-dtype", "fp32",
    "--loss-chunk-tokens", "512",
)


def test_plan_config_equals_plan_with_the_equivalent_flags(tmp_path):
    config = _write(tmp_path / "c.yaml", _CONFIG)
    from_yaml = _plan_json(config)
    assert from_yaml == _plan_json(*_EQUIVALENT_FLAGS)
    s = from_yaml["setup"]
    assert (s["rank"], s["lora_alpha"], s["target_modules"], s["max_seq_len"], s["grad_accum"]) == (
        8, 16.0, "q_proj,v_proj", 256, 4)
    assert from_yaml["tokens"] == 1e7 and "default" in from_yaml["tokens_basis"]


def test_fields_a_config_leaves_out_take_train_config_defaults(tmp_path):
    s = _plan_json(_write(tmp_path / "c.yaml", "rank: 4\n"))["setup"]
    assert (s["batch_size"], s["max_seq_len"], s["gradient_checkpointing"], s["loss_chunk_tokens"]) == (
        8, 512, False, 1024)  # TrainConfig's defaults: what `tailor train` would run
    default_model = _plan_json(_write(tmp_path / "m.yaml", "method: lora\n"))["model"]
    assert default_model == "SmolLM2-135M"  # train's default model, SmolLM2-135M-Instruct, in the catalogue


def test_a_flag_overrides_the_config(tmp_path):
    config = _write(tmp_path / "c.yaml", _CONFIG)
    overridden = _plan_json(config, "--batch-size", "4", "--lora-alpha", "64", "--no-gradient-checkpointing")
    assert overridden == _plan_json(*_EQUIVALENT_FLAGS, "--batch-size", "4", "--lora-alpha", "64",
                                    "--no-gradient-checkpointing")
    s = overridden["setup"]
    assert (s["batch_size"], s["lora_alpha"], s["gradient_checkpointing"], s["rank"]) == (4, 64.0, False, 8)
    # a flag that changes the method re-reads the config's precision for the new method
    full = _plan_json(config, "--method", "full")["setup"]
    assert (full["method"], full["precision"], full["lora_dropout"]) == ("full", "bf16-mixed", 0.0)


def test_old_flag_spellings_still_work(tmp_path):
    old = _plan_json("--alpha", "16", "--seq-len", "512", "--grad-accumulation", "4")
    new = _plan_json("--lora-alpha", "16", "--max-seq-len", "512", "--grad-accum", "4")
    assert old == new and new["setup"]["lora_alpha"] == 16.0 and new["setup"]["grad_accum"] == 4
    old_advice = json.loads(_invoke("advise", "--examples", "2000", "--seq-len", "256", "--json"))
    assert old_advice["recipe"]["max_seq_len"] == 256


@pytest.mark.parametrize(
    ("method", "precision", "planned"),
    [("lora", "bf16", "bf16"), ("full", "bf16", "bf16-mixed"), ("lora", "fp32", "fp32"),
     ("full", "fp32", "fp32")],
)
def test_train_precision_is_mapped_to_the_planners(tmp_path, method, precision, planned):
    config = _write(tmp_path / "c.yaml", f"method: {method}\nprecision: {precision}\n")
    s = _plan_json(config)["setup"]
    assert (s["precision"], s["adapter_dtype"]) == (planned, "fp32")


def test_max_steps_sets_an_upper_bound_on_tokens(tmp_path):
    config = _write(tmp_path / "c.yaml", "max_steps: 10\nbatch_size: 2\ngrad_accum: 3\nmax_seq_len: 128\n")
    result = _plan_json(config)
    assert result["tokens"] == 10 * 2 * 3 * 128
    assert "upper bound" in result["tokens_basis"] and "max_steps" in result["tokens_basis"]
    assert "upper bound" in _invoke("plan", config)
    assert _plan_json(config, "--batch-size", "4")["tokens"] == 10 * 4 * 3 * 128  # resolved values
    given = _plan_json(config, "--tokens", "5e6")
    assert given["tokens"] == 5e6 and "upper bound" not in given["tokens_basis"]


def test_unknown_config_key_names_file_line_and_key(tmp_path):
    config = _write(tmp_path / "c.yaml", "model: SmolLM2-135M-Instruct\nrank: 8\nalpha: 16\n")
    result = runner.invoke(app, ["plan", config])
    assert result.exit_code == 2
    assert f"{config}:3" in result.output and "'alpha'" in result.output and "lora_alpha" in result.output
    bad_value = runner.invoke(app, ["plan", _write(tmp_path / "v.yaml", "batch_size: 0\n")])
    assert bad_value.exit_code == 2 and "batch_size" in bad_value.output
    missing = runner.invoke(app, ["plan", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 2 and "none.yaml" in missing.output


@pytest.mark.slow  # trains the real default model for 2 steps (about a minute on 2 cores)
def test_advise_train_plan_acceptance(tmp_path):
    def tailor(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "tailor.cli", *args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    tailor("advise", "--examples", "2000", "--gpu-memory", "24", "--out", "r.yaml")
    tailor("train", "r.yaml", "--data", "builtin:support", "--max-steps", "2", "--out", "run")
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    trained = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    recipe = yaml.safe_load((tmp_path / "r.yaml").read_text())
    from tailor.hardware import precision_for

    assert recipe["precision"] == "auto" and trained["precision"] == precision_for("auto")  # resolved here
    assert {k: trained[k] for k in recipe if k != "precision"} == {k: v for k, v in recipe.items()
                                                                   if k != "precision"}
    planned = json.loads(tailor("plan", "r.yaml", "--json"))
    assert planned["setup"]["batch_size"] == recipe["batch_size"] and planned["model"] == "SmolLM2-135M"
