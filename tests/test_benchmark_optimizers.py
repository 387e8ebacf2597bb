"""benchmarks/optimizers.py end to end on a tiny model: every configuration runs, the 8-bit state is smaller
than adamw's, and the planner's figure it prints is within 20% of the state measured."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "optimizers.py"


def test_one_step_of_each_optimizer_on_a_tiny_model(tmp_path):
    from tailor.models import DEFAULT_MODEL, load_tokenizer

    spec = importlib.util.spec_from_file_location("optimizers_benchmark", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["optimizers_benchmark"] = bench
    spec.loader.exec_module(bench)

    torch.manual_seed(0)
    tokenizer = load_tokenizer(DEFAULT_MODEL)  # the real tokenizer: the built-in data needs its chat template
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "result.json"

    # rank 32 on a 128-wide model: A (32, 128) and B (128, 32) reach bitsandbytes' 4096-element 8-bit floor
    bench.main(["--model", str(model_dir), "--configs", "adamw,adamw-8bit,paged-adamw-8bit", "--steps", "1",
                "--warmup", "1", "--rank", "32", "--train-examples", "16", "--eval-examples", "4",
                "--batch-size", "4", "--max-seq-len", "256", "--threads", "1", "--json", str(out)])

    report = json.loads(out.read_text())
    assert report["cpu_capability"] and report["threads"] == 1
    for name, result in report["configs"].items():
        assert result["status"] == "ok", (name, result.get("error"))
        assert result["timed_steps"] == 1 and result["tokens_per_s"] > 0
        assert math.isfinite(result["val_loss"])
        planned, measured = result["planned_state_bytes"], result["optimizer_state_bytes"]
        assert abs(planned - measured) <= 0.2 * measured, (name, planned, measured)
    assert report["configs"]["adamw-8bit"]["state_ratio"] < 0.5
