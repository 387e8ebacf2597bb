"""benchmarks/train_throughput.py: its arithmetic, and a 2-step run of every configuration on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


def auto_precision(device: str) -> str:
    """What the trainer's precision `auto` runs on `device` (tailor.hardware's rule)."""
    from tailor.hardware import resolve_precision

    return resolve_precision("auto", device).resolved


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_throughput"] = module
    spec.loader.exec_module(module)
    return module


def test_flops_formula_counts_frozen_weights_twice_and_trained_three_times(bench):
    counts = {"n_body": 1000, "n_head": 500, "n_lora": 10}
    assert bench.flops_per_token(counts, 0.4, full=False) == 4 * 1000 + 4 * 0.4 * 500 + 6 * 10
    assert bench.flops_per_token(counts, 1.0, full=True) == 6 * 1000 + 6 * 500


def test_parameter_counts_split_body_head_and_adapters(bench):
    from tailor.lora import LoraConfig, add_lora

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    plain = bench.parameter_counts(model)
    # q, o: 16x16; k, v: 16x8; gate, up, down: 16x32
    assert plain["n_body"] == 2 * 256 + 2 * 128 + 3 * 512
    assert plain["n_head"] == 64 * 16 and plain["n_lora"] == 0
    add_lora(model, LoraConfig(r=2, target_modules="all-linear"))
    with_lora = bench.parameter_counts(model)
    assert with_lora["n_body"] == plain["n_body"]
    assert with_lora["n_lora"] == with_lora["trainable"] > 0


def test_summarise_excludes_warmup_steps(bench):
    # (wall, cpu, tokens, supervised) at the end of each step; index 0 is the start
    marks = [(0.0, 0.0, 0, 0), (10.0, 9.0, 100, 40), (11.0, 10.0, 100, 40), (13.0, 12.0, 200, 80)]
    result = bench.summarise(marks, warmup=1, device="cpu")
    assert result["timed_steps"] == 2 and result["tokens"] == 300
    assert result["tokens_per_s"] == pytest.approx(100.0)
    assert result["s_per_step"] == pytest.approx(1.5)
    assert result["supervised_share"] == pytest.approx(0.4)


def test_compare_picks_fastest_peft_and_reports_ratio(bench):
    def ok(tps, loss, rss):
        return {"status": "ok", "tokens_per_s": tps, "tokens_per_cpu_s": tps, "eval_loss": loss,
                "peak_rss_mib": rss, "flops_per_token": 1e9}

    results = {"peft-fp32": ok(100, 1.0, 3000), "peft-bf16": ok(150, 1.02, 2000),
               "tailor": ok(450, 1.01, 1500), "tailor-full": {"status": "failed", "error": "x"}}
    summary = bench.compare(results, peak_tflops=1.0)
    assert summary["peft_best"] == "peft-bf16"
    assert summary["ratio_vs_peft_best"] == pytest.approx(3.0)
    assert summary["eval_loss_gap_vs_peft_fp32"] == pytest.approx(0.01)
    assert summary["peak_rss_ratio_vs_peft_best"] == pytest.approx(0.75)
    assert results["tailor"]["fraction_of_peak"] == pytest.approx(0.45)
    assert summary["goal"] == {"tokens_per_s": True, "eval_loss": True, "peak_rss": True,
                               "loss_compared_with": "peft-bf16"}
    table = bench.format_table(results)
    assert "failed" in table and "450.0" in table


def test_loss_goal_uses_peft_on_the_same_batches_when_present(bench):
    def ok(tps, loss, rss):
        return {"status": "ok", "tokens_per_s": tps, "eval_loss": loss, "peak_rss_mib": rss,
                "flops_per_token": 1e9}

    results = {"peft-bf16": ok(100, 1.10, 2000), "tailor": ok(290, 1.00, 2100),
               "tailor-no-prefix-sharing": ok(200, 1.00, 2200), "peft-same-batches": ok(110, 0.97, 2000)}
    summary = bench.compare(results, peak_tflops=1.0)
    assert summary["eval_loss_gap_vs_peft_best"] == pytest.approx(-0.0909, abs=1e-4)
    assert summary["eval_loss_gap_vs_peft_same_batches"] == pytest.approx(0.0309, abs=1e-4)
    assert summary["prefix_sharing_speedup"] == pytest.approx(1.45)
    assert summary["goal"] == {"tokens_per_s": False, "eval_loss": False, "peak_rss": False,
                               "loss_compared_with": "peft-same-batches"}


def test_dora_rows_are_compared_with_lora_in_the_same_library(bench):
    def ok(tps, step, **extra):
        return {"status": "ok", "tokens_per_s": tps, "s_per_step": step, "eval_loss": 1.0,
                "peak_rss_mib": 100, "flops_per_token": 1e9, **extra}

    results = {"peft-fp32": ok(100, 2.0), "peft-autocast-bf16": ok(120, 1.6), "tailor": ok(400, 0.5),
               "tailor-dora": ok(320, 0.6), "peft-dora": ok(80, 2.4, variant="peft-fp32")}
    summary = bench.compare(results, peak_tflops=1.0)
    assert summary["peft_best"] == "peft-autocast-bf16"  # PEFT's DoRA is not a candidate for PEFT best
    assert summary["dora_step_time_vs_lora"] == pytest.approx(1.2)
    assert summary["peft_dora_step_time_vs_lora"] == pytest.approx(1.2)  # against peft-fp32, its precision
    assert summary["tailor_dora_vs_peft_dora"] == pytest.approx(4.0)


def test_unknown_configuration_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "peft-fp32,tailr"])


def test_default_configs_leave_out_bf16_peft_where_bf16_is_not_native(bench, tmp_path):
    from _shared import train_config

    from tailor.hardware import native_bf16

    args = bench.parse_args(["--device", "cpu"])
    if native_bf16("cpu"):
        assert args.config_list == list(bench.ALL_CONFIGS) and args.skipped_configs is None
        assert args.same_batches_variant == "peft-autocast-bf16"
    else:  # ~100x slower bf16 matmuls: hours; PEFT on such a machine runs fp32
        bf16_peft = ("peft-autocast-bf16", "peft-bf16")
        assert args.config_list == [c for c in bench.ALL_CONFIGS if c not in bf16_peft]
        assert "peft-autocast-bf16, peft-bf16" in args.skipped_configs
        assert "no native bf16" in args.skipped_configs
        assert args.same_batches_variant == "peft-fp32"
    explicit = bench.parse_args(["--device", "cpu", "--configs", "peft-bf16,tailor"])
    assert explicit.config_list == ["peft-bf16", "tailor"] and explicit.skipped_configs is None
    # tailor trains with what the trainer's `auto` runs here
    config = train_config(args, "lora", "cpu", str(tmp_path / "run"))
    assert config.precision == auto_precision("cpu")


def test_machine_info_is_what_hardware_says(bench, capsys):
    from _shared import machine_info, print_machine

    from tailor import hardware

    info = machine_info("cpu")
    assert info == {"cpu_capability": hardware.cpu_capability(), "native_bf16": hardware.native_bf16("cpu"),
                    "precision": auto_precision("cpu"), "threads": torch.get_num_threads(),
                    "torch": torch.__version__}
    assert print_machine("cpu") == info
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"machine: {info['cpu_capability']}, native bf16 ")
    assert f"precision auto -> {info['precision']}" in line


@pytest.mark.slow
def test_two_steps_of_each_configuration_on_a_tiny_model(bench, tmp_path):
    from tailor.hardware import cpu_capability, native_bf16
    from tailor.models import DEFAULT_MODEL, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(DEFAULT_MODEL)  # the real tokenizer: the built-in data needs its chat template
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "result.json"

    bench.main(["--model", str(model_dir), "--steps", "2", "--warmup", "1", "--train-examples", "24",
                "--eval-examples", "8", "--threads", "1", "--json", str(out)])

    report = json.loads(out.read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert report["cpu_capability"] == cpu_capability() and report["native_bf16"] == native_bf16(device)
    assert report["precision"] == auto_precision(device)
    assert set(report["tokens_per_s"]) == set(bench.default_configs(device)[0])
    for name, result in report["configs"].items():
        assert result["status"] == "ok", (name, result.get("error"))
        assert result["timed_steps"] == 2
        assert result["tokens_per_s"] > 0 and result["peak_rss_mib"] > 0
        assert math.isfinite(result["eval_loss"]) and math.isfinite(result["last_train_loss"])
    assert report["peft_best"] in bench.PEFT_CONFIGS
    assert report["ratio_vs_peft_best"] > 0
    assert report["dora_step_time_vs_lora"] > 0 and report["peft_dora_step_time_vs_lora"] > 0
    assert report["matmul_tflops"]["bf16"] > 0
    # same init, same recipe, 3 tiny steps: LoRA losses agree closely between PEFT and tailor
    assert abs(report["eval_loss_gap_vs_peft_fp32"]) < 0.02
    same = report["configs"]["peft-same-batches"]
    assert same["variant"] == report["peft_best"]
    assert same["padding_share"] == report["configs"]["tailor"]["padding_share"]  # tailor's batches
    assert abs(report["eval_loss_gap_vs_peft_same_batches"]) < 0.01


def test_computed_share_counts_a_shared_prefix_once(bench):
    from tailor.data.tokenize import TokenizedExample

    prefix = list(range(100, 120))  # 20 tokens, above MIN_SHARED_PREFIX
    rows = [prefix + [1, 2, 3], prefix + [4, 5], prefix + [6, 7, 8, 9]]
    train_set = [TokenizedExample(input_ids=r, labels=r) for r in rows]
    real = 23 + 22 + 24
    assert bench.computed_share(train_set, [[0, 1, 2]], share_prefix=False) == 1.0
    assert bench.computed_share(train_set, [[0, 1, 2]], share_prefix=True) == pytest.approx(
        (real - 2 * 20) / real, abs=1e-4)
    counts = {"n_body": 1000, "n_head": 500, "n_lora": 10}
    assert bench.flops_per_token(counts, 0.4, full=False, computed_share=0.5) == (
        4 * 500 + 4 * 0.4 * 500 + 6 * 5)


def test_replay_kl_benchmark_times_each_loss_and_the_cache_changes_no_value():
    from conftest import VOCAB, tiny_llama

    from tailor.lora import LoraConfig, add_lora

    path = BENCHMARK.parent / "replay_kl_step.py"
    spec = importlib.util.spec_from_file_location("replay_kl_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = add_lora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "replay_index": torch.tensor([0, 1, 2])}
    results = module.measure(model, batch, rounds=2)
    assert list(results) == ["ce", "kl", "kl cached"]
    assert all(r["min_s"] > 0 and r["median_s"] >= r["min_s"] for r in results.values())
    kl = results["kl"]["loss"]
    assert kl > 0.01 and results["kl cached"]["loss"] == pytest.approx(kl)


def test_gpu_check_without_cuda_prints_one_line_and_exits_0():
    """benchmarks/gpu_check.sh on a machine whose torch sees no CUDA device: one line, exit 0."""
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu_check.sh would run its checks")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env["GPU_CHECK_PYTHON"] = sys.executable  # the test's own Python (its torch) is among those asked
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device here"), done.stdout
    assert f"{sys.executable}: {torch.__version__} False" in lines[0]
