"""Real CUDA checks (marker `cuda`; `bash benchmarks/gpu_check.sh` runs them as `pytest -m cuda`).

Skipped where torch sees no CUDA device. On one, each compares what tailor computes on the GPU with a
reference: the same LoRA layer in fp32 on the CPU; transformers + bitsandbytes' own NF4 loading of the same
weights; a `tailor train` run's loss and memory record; the serving engine's greedy tokens on the CPU.

TAILOR_CUDA_TESTS_DEVICE=cpu runs the same code with the CPU in the GPU's place: a dry run of the tests
themselves on a machine without a GPU (the comparisons then check the code paths, not CUDA's numerics).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, chat_tokenizer, tiny_chat_llama, tiny_model_dir, write_arithmetic_jsonl
from transformers import LlamaConfig, LlamaForCausalLM

DEVICE = os.environ.get("TAILOR_CUDA_TESTS_DEVICE", "cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                       reason="no CUDA device (torch.cuda.is_available() is False)"),
]


def llama64(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A tiny Llama whose linear layers all have a multiple of 32 outputs (2 kv heads of 16), as
    bitsandbytes' blockwise quantization likes them."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=128, **overrides)
    return LlamaForCausalLM(config).eval()


def close_in_bf16(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal within what bf16 (8 bits of mantissa) allows, relative to the tensor's scale."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= 2e-2 * scale + 1e-6, f"{what}: max |error| {error:.3g} for values up to {scale:.3g}"


def test_lora_layer_forward_and_backward_on_the_device_equal_cpu_fp32():
    from tailor.lora import LoraConfig, add_lora, lora_layers

    torch.manual_seed(0)
    model = add_lora(llama64(),
                     LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    layer = lora_layers(model)["model.layers.0.mlp.up_proj"]
    with torch.no_grad():  # a B that does something (it starts at zero)
        layer.lora_B["default"].weight.normal_(0, 0.5)
    x = torch.randn(3, 7, 64)
    grad_out = torch.randn(3, 7, 128)

    def run(module, x, grad_out):
        x = x.clone().requires_grad_(True)
        y = module(x)
        y.backward(grad_out)
        return y, x.grad, module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad

    expected = run(layer, x, grad_out)  # CPU, fp32
    on_device = copy.deepcopy(layer).to(DEVICE)
    on_device.base_layer.to(torch.bfloat16)  # the frozen base in bf16, the adapter in fp32: how tailor trains
    actual = run(on_device, x.to(DEVICE, torch.bfloat16), grad_out.to(DEVICE, torch.bfloat16))
    assert actual[0].device.type == torch.device(DEVICE).type and actual[0].dtype == torch.bfloat16
    names = ("output", "input grad", "lora_A grad", "lora_B grad")
    for name, a, e in zip(names, actual, expected, strict=True):
        close_in_bf16(a, e, name)


def test_dora_on_the_device_equals_cpu_fp32_and_pefts_dora_on_an_nf4_base(tmp_path):
    """DoRA (use_dora): its layer under bf16 on the device against fp32 on the CPU; on an NF4 base on the
    device, the model's logits against PEFT's DoRA loading the same adapter onto the same base."""
    import warnings

    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from tailor.adapters import load_adapter, save_adapter
    from tailor.lora import LoraConfig, add_lora, lora_layers
    from tailor.quant import quantize_model

    config = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "use_dora": True}
    model = add_lora(llama64(), LoraConfig(**config))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B that does something (it starts at zero), magnitudes off their start
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=generator)
                p.copy_(p * (1 + 0.3 * noise) if "lora_magnitude_vector" in name else noise * 0.3)
    layer = lora_layers(model)["model.layers.0.mlp.up_proj"]
    x, grad_out = torch.randn(3, 7, 64), torch.randn(3, 7, 128)

    def run(module, x, grad_out):
        x = x.clone().requires_grad_(True)
        module(x).backward(grad_out)
        return [x.grad] + [p.grad for p in module.adapter_parameters("default")]

    expected = run(layer, x, grad_out)  # CPU, fp32
    on_device = copy.deepcopy(layer).to(DEVICE)
    on_device.base_layer.to(torch.bfloat16)  # the frozen base in bf16, the adapter in fp32: how tailor trains
    actual = run(on_device, x.to(DEVICE, torch.bfloat16), grad_out.to(DEVICE, torch.bfloat16))
    for name, a, e in zip(("input", "lora_A", "lora_B", "magnitude"), actual, expected, strict=True):
        close_in_bf16(a, e, f"DoRA {name} grad")

    save_adapter(model, tmp_path / "dora")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ours = quantize_model(llama64().to(DEVICE), "nf4", compute_dtype=torch.float32)
    load_adapter(ours, tmp_path / "dora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = quantize_model(llama64().to(DEVICE), "nf4", compute_dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "dora").eval()
    with torch.no_grad():
        got, want = ours.eval()(ids).logits, theirs(input_ids=ids).logits
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-4 * scale, "NF4 DoRA logits against PEFT's"


def test_nf4_loading_equals_transformers_and_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tailor.models import load_model

    directory = tiny_model_dir(tmp_path / "tiny", builder=llama64)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    model, _ = load_model(str(directory), dtype=torch.bfloat16, device=DEVICE, quantize="nf4")
    layer = model.model.layers[0].mlp.up_proj
    assert type(layer).__name__ == "Linear4bit" and layer.weight.quant_state.quant_type == "nf4"
    assert layer.weight.device.type == torch.device(DEVICE).type
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config,
                                                     dtype=torch.bfloat16, device_map={"": DEVICE}).eval()
    with torch.no_grad():
        ours = model(ids.to(DEVICE)).logits
        theirs = reference(ids.to(DEVICE)).logits
    close_in_bf16(ours, theirs, "NF4 logits, tailor against transformers + bitsandbytes")


def test_two_training_steps_lower_the_loss_and_record_cuda_memory(tmp_path):
    directory = tiny_model_dir(tmp_path / "tiny")
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl", n=8)
    out = tmp_path / "run"
    # every step sees the whole training set (one batch), so the second step's loss is the first's after
    # one update
    done = subprocess.run(
        [sys.executable, "-m", "tailor", "train", "--model", str(directory), "--data", str(data),
         "--out", str(out), "--max-steps", "2", "--batch-size", "8", "--rank", "4", "--lora-alpha", "8",
         "--lr", "1e-2", "--device", DEVICE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    summary = json.loads((out / "summary.json").read_text())
    assert summary["planned_peak_gib"] > 0
    if DEVICE.startswith("cuda"):
        assert summary["peak_cuda_gib"] > 0


def test_serving_engine_on_the_device_gives_the_cpu_greedy_tokens(tmp_path):
    from tailor.adapters.format import save_adapter
    from tailor.lora import LoraConfig, add_lora, lora_layers
    from tailor.serve import AdapterManager, Engine, SamplingParams

    tokenizer = chat_tokenizer()
    for seed, name in enumerate(("alpha", "beta")):
        model = add_lora(tiny_chat_llama(len(tokenizer), seed=3),
                         LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                weight = layer.lora_B["default"].weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
        save_adapter(model, tmp_path / name)
    texts = ["<|im_start|>user\nWhere is my order ORD-12345?<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nI want a refund for my kettle.<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    adapters = ["alpha", "beta", None]

    def greedy(device: str) -> list[list[int]]:
        model = tiny_chat_llama(len(tokenizer), seed=3).to(device)  # fp32 on both: the same numbers
        engine = Engine(model, tokenizer, adapters=AdapterManager(model, Path(tmp_path), max_loras=2,
                                                                  max_lora_rank=4), max_batch=4)
        requests = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True), adapters=adapters)
        engine.adapters.close()
        return [r.output_ids for r in requests]

    on_cpu, on_device = greedy("cpu"), greedy(DEVICE)
    assert on_device == on_cpu
    assert on_cpu[0] != on_cpu[2] or on_cpu[1] != on_cpu[2]  # the adapters change what is generated
