"""Resume after a real SIGKILL reaches the same adapter as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model_dir, write_arithmetic_jsonl
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from tailor.train.checkpoint import list_checkpoints


def _command(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    # lora_dropout > 0 makes the result depend on the restored RNG state, not only on the weights
    return [sys.executable, "-m", "tailor.cli", "train", "--model", str(model_dir), "--data", str(data),
            "--out", str(out), "--max-steps", "60", "--batch-size", "4", "--rank", "4", "--lora-alpha", "8",
            "--lr", "3e-3", "--save-every", "10", "--eval-every", "40", "--set", "lora_dropout=0.1",
            "--set", "num_threads=1", "--set", "progress=false", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


# the optimizer's own state (LoRA+'s groups, 8-bit moments) and a PiSSA base rebuilt on resume
VARIANTS = {
    "adamw": (),
    "loraplus-pissa": ("--loraplus-lr-ratio", "16", "--init-lora-weights", "pissa_niter_2"),
    # bitsandbytes keeps tensors under 4096 elements in 32 bits: rank 32 on a 128-wide model gives 8-bit
    # moments to the (32, 128) A's and the (128, 32) B's
    "adamw-8bit": ("--optimizer", "adamw-8bit", "--rank", "32"),
}


def wider_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **overrides)).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, variant):
    model_dir = tiny_model_dir(tmp_path / "model", builder=wider_llama if variant == "adamw-8bit" else None)
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl", n=64)
    options = VARIANTS[variant]

    reference = tmp_path / "reference"
    done = subprocess.run(_command(model_dir, data, reference, *options), env=_env(), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(_command(model_dir, data, killed, *options), env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list_checkpoints(killed / "checkpoints"):
        assert process.poll() is None, "the run ended before its first checkpoint could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "adapter").exists(), "killed before the end"
    stopped_at = int(list_checkpoints(killed / "checkpoints")[-1].name.split("-")[1])
    assert stopped_at < 60

    result = subprocess.run(_command(model_dir, data, killed, *options, "--resume"), env=_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]

    ours = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(float(t.abs().max()) > 0 for k, t in ours.items() if "lora_B" in k)  # it trained

    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61)), "metrics continue without gaps or duplicates"
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step-{stopped_at:06d}")
    # the checkpoint holds what the variant is: 8-bit moments, or LoRA+'s groups (B at 16 x A's rate)
    saved = torch.load(list_checkpoints(killed / "checkpoints")[-1] / "optimizer.pt", weights_only=True)
    # bitsandbytes nests its moments under one key of each parameter's state
    states = [state.get("__bnb_optimizer_quant_state__", state) for state in saved["state"].values()]
    moments = [t for state in states for t in state.values() if torch.is_tensor(t)]
    assert any(t.dtype == torch.uint8 for t in moments) == (variant == "adamw-8bit")
    scales = sorted({group["lr_scale"] for group in saved["param_groups"]})
    assert scales == ([1.0, 16.0] if variant == "loraplus-pissa" else [1.0])
