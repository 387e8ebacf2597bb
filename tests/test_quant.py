"""QLoRA (tailor.quant + methods qlora-nf4 / qlora-int8) on tiny models: layers, bytes, training, the
eval-repack trap, merge, save/attach, PEFT interop and one `tailor train` run."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, synthetic_examples, tiny_gpt2, tiny_llama, tiny_model_dir, write_arithmetic_jsonl
from transformers import LlamaConfig, LlamaForCausalLM

bnb = pytest.importorskip("bitsandbytes")

from tailor.config import TrainConfig  # noqa: E402
from tailor.lora import disable_adapters, lora_layers, merge_lora, trainable_parameters  # noqa: E402
from tailor.loss import KLReplay, collate_batch, supervised_loss, validation_loss  # noqa: E402
from tailor.methods import get_method  # noqa: E402
from tailor.methods.base import cast_weights  # noqa: E402
from tailor.quant import (  # noqa: E402
    MissingDependencyError,
    dequantize_model,
    dequantized_weight,
    frozen_weight_bytes,
    import_bitsandbytes,
    quantize_model,
    quantized_layers,
)
from tailor.train import fit  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 0
KINDS = ["nf4", "int8"]
METHOD = {"nf4": "qlora-nf4", "int8": "qlora-int8"}
LAYER = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}


def llama(hidden: int = 64, intermediate: int = 128, seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama whose every linear layer has a multiple of 32 outputs (k/v: 2 heads of 16): what
    bitsandbytes' CPU inference repack needs, so the eval-repack trap can show on it."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=hidden // 16, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def train_config(tmp_path: Path, kind: str, **overrides) -> TrainConfig:
    values = dict(method=METHOD[kind], data="synthetic", precision="bf16", batch_size=8, max_steps=4,
                  lr=1e-2, rank=8, lora_alpha=16.0, max_grad_norm=None, progress=False, keep_best=False,
                  out=str(tmp_path), seed=0)
    values.update(overrides)
    return TrainConfig(**values).validate()


def prepared(kind: str, model=None, tmp_path: Path = Path("unused"), seed_b: int | None = 1, **overrides):
    """`model` (tiny Llama by default) prepared by the QLoRA method; B random (the adapter does something)."""
    model = model if model is not None else tiny_llama()
    model = get_method(METHOD[kind]).prepare(model, train_config(tmp_path, kind, **overrides))
    if seed_b is not None:
        generator = torch.Generator().manual_seed(seed_b)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------------- the layers
@pytest.mark.parametrize("training", [True, False])
def test_nf4_layer_equals_matmul_on_dequantized_weight(training):
    model = quantize_model(llama().to(torch.bfloat16), "nf4")
    layer = model.model.layers[0].mlp.up_proj
    assert type(layer).__name__ == "Linear4bit" and layer.weight.quant_state.quant_type == "nf4"
    assert layer.weight.quant_state.nested  # double quantization
    weight = dequantized_weight(layer, torch.bfloat16)
    assert weight.shape == (layer.out_features, layer.in_features) == (128, 64)
    layer.train(training)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    expected_x = x.detach().clone().requires_grad_(True)
    expected = F.linear(expected_x, weight)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    grad = torch.randn_like(y)
    y.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, expected_x.grad, rtol=0, atol=0)


def test_quantized_weights_are_close_to_the_originals():
    for kind, worst in (("nf4", 0.15), ("int8", 0.01)):
        original = llama().to(torch.bfloat16)
        reference = {k: m.weight.detach().clone() for k, m in original.named_modules()
                     if isinstance(m, torch.nn.Linear)}
        model = quantize_model(original, kind)
        for key, layer in quantized_layers(model).items():
            w = reference[key].float()
            error = (dequantized_weight(layer, torch.float32) - w).abs().max() / w.abs().max()
            assert error < worst, (kind, key, float(error))


def test_biases_are_kept_and_the_bias_path_trains():
    torch.manual_seed(0)
    from transformers import Qwen2Config, Qwen2ForCausalLM  # q/k/v have biases

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    bias = model.model.layers[0].self_attn.q_proj.bias.detach().clone()
    quantize_model(model, "nf4")
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and torch.equal(layer.bias, bias)
    assert not layer.bias.requires_grad


def test_what_stays_unquantized_stays_bf16():
    model = quantize_model(tiny_llama().to(torch.bfloat16), "nf4")
    names = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in names
    assert type(model.lm_head) is torch.nn.Linear  # the output head, as transformers' integration
    assert len(quantized_layers(model)) == 2 * 7  # q k v o gate up down in each block
    for name, p in model.named_parameters():
        if not any(name.startswith(k) for k in quantized_layers(model)):
            assert p.dtype == torch.bfloat16, name  # not cast to fp32 as PEFT's kbit preparation does


def test_skip_and_refusals():
    model = quantize_model(tiny_llama().to(torch.bfloat16), "int8", skip=["down_proj"])
    assert len(quantized_layers(model)) == 2 * 6
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    with pytest.raises(ValueError, match="unknown quantization kind 'fp4'"):
        quantize_model(tiny_llama(), "fp4")
    with pytest.raises(ValueError, match="no nn.Linear layer to quantize"):
        quantize_model(tiny_gpt2(), "nf4")  # GPT-2's Conv1D layers: nothing for bitsandbytes
    lora = prepared("nf4")
    with pytest.raises(ValueError, match="quantize the base first"):
        quantize_model(lora, "nf4")


def test_dequantize_model_gives_plain_linear_layers_with_the_same_outputs(ids):
    for kind in KINDS:
        model = quantize_model(tiny_llama().to(torch.bfloat16), kind)
        before = logits(model, ids)
        weights = {k: dequantized_weight(m) for k, m in quantized_layers(model).items()}
        dequantize_model(model)
        assert not quantized_layers(model)
        for key, w in weights.items():
            layer = model.get_submodule(key)
            assert type(layer) is torch.nn.Linear and torch.equal(layer.weight, w)
            assert not layer.weight.requires_grad
        # int8 in eval mode runs LLM.int8() on fp16-cast activations, not the dequantized weight
        tolerance = 0.0 if kind == "nf4" else 0.01
        assert (logits(model, ids) - before).abs().max().item() <= tolerance


# ------------------------------------------------------------------------------------------------- bytes
def test_frozen_weight_bytes_nf4_at_most_030_of_bf16_int8_about_half():
    ratios = {}
    for kind in KINDS:
        model = quantize_model(llama(hidden=256, intermediate=512).to(torch.bfloat16), kind)
        counted = frozen_weight_bytes(model)
        assert counted.layers == 14
        assert counted.bf16 == 2 * 2 * (2 * 256 * 256 + 2 * 256 * 32 + 3 * 256 * 512)
        ratios[kind] = counted.ratio
    assert ratios["nf4"] <= 0.30
    assert 0.49 <= ratios["int8"] <= 0.52
    # the method's total: quantized layers as stored + every other frozen tensor (embeddings, norms, head)
    model = prepared("nf4", llama(hidden=256, intermediate=512))
    method_bytes = get_method("qlora-nf4").frozen_weight_bytes(model)
    rest = sum(p.numel() * 2 for n, p in model.named_parameters() if "lora_" not in n
               and not any(n.startswith(k) for k in quantized_layers(model)))
    assert method_bytes == frozen_weight_bytes(model).quantized + rest


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", KINDS)
def test_qlora_training_reduces_the_loss(kind, tmp_path):
    model = get_method(METHOD[kind]).prepare(tiny_llama(), train_config(tmp_path, kind))
    packed = {"nf4": torch.uint8, "int8": torch.int8}[kind]
    assert all(m.weight.dtype == packed for m in quantized_layers(model).values())  # no cast undid them
    config = train_config(tmp_path, kind, max_steps=25, eval_every=10)
    fit(model, synthetic_examples(), synthetic_examples(8, seed=1), config, tmp_path, PAD,
        lambda m, d: None)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.3, (lines[0]["loss"], lines[-1]["loss"])
    assert [x["step"] for x in lines if "val_loss" in x] == [10, 20, 25]  # validation mid-training
    assert len(quantized_layers(model)) == 14 and all(
        not p.requires_grad for k, m in quantized_layers(model).items() for p in m.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_kl_replay_holds_the_model_to_the_quantized_base(kind, ids):
    """replay_loss kl on a quantized base: the base it diverges from is the packed model, adapter off."""
    model = prepared(kind)
    with torch.no_grad():  # an adapter that has moved the model well away from the base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(5)
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "replay_index": torch.tensor([0, 1])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, n = supervised_loss(model, batch, replay=KLReplay())
        tuned = model(ids).logits[:, :-1].float()
        with torch.no_grad(), disable_adapters(model):
            base = model(ids).logits[:, :-1].float()
    kept = labels[:, 1:] != -100
    kl = F.kl_div(tuned[kept].log_softmax(-1), base[kept].log_softmax(-1), log_target=True, reduction="sum")
    assert n == int(kept.sum()) and kl > 0.1
    torch.testing.assert_close(loss_sum, kl, rtol=2e-2, atol=1e-3)


def test_trainable_parameters_equal_lora_and_total_counts_the_unpacked_weights(tmp_path):
    lora = get_method("lora").prepare(tiny_llama(), train_config(tmp_path, "nf4", method="lora"))
    for kind in KINDS:
        qlora = prepared(kind, seed_b=None)
        assert trainable_parameters(qlora) == trainable_parameters(lora)
        assert {n for n, p in qlora.named_parameters() if p.requires_grad} == \
               {n for n, p in lora.named_parameters() if p.requires_grad}
        assert all(p.dtype == torch.float32 for p in qlora.parameters() if p.requires_grad)


# -------------------------------------------------------------------------------------- eval-repack trap
def gradients(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, n = supervised_loss(model, batch)
    (loss_sum / n).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def evaluation_changes_gradients(model) -> float:
    """Largest change of any LoRA gradient caused by a validation pass between two identical steps."""
    batch = collate_batch(synthetic_examples()[:8], PAD, torch.device("cpu"))
    before = gradients(model, batch)
    assert all(g.abs().max() > 0 for g in before.values())
    val = validation_loss(model, synthetic_examples(8, seed=1), 4, PAD, "bf16")  # what EvaluationHook runs
    assert val is not None and model.training
    after = gradients(model, batch)
    return max((after[k] - before[k]).abs().max().item() for k in before)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_after_an_evaluation_equal_gradients_without_one(kind):
    model = prepared(kind, llama())
    assert evaluation_changes_gradients(model) == 0.0


def test_activation_checkpointing_gives_the_same_gradients():
    batch = collate_batch(synthetic_examples()[:8], PAD, torch.device("cpu"))
    plain = gradients(prepared("nf4", llama()), batch)
    checkpointed = gradients(prepared("nf4", llama(), gradient_checkpointing=True), batch)
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="the repack happens on avx512_bf16 CPUs only")
# torch's own hint at the trap: the inference kernel has no autograd
@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered:UserWarning")
def test_the_trap_is_real_with_bitsandbytes_defaults():
    """With bitsandbytes' own behaviour (CPU inference repack on) the same check fails: the test above can
    catch the trap."""
    model = llama().to(torch.bfloat16)
    quantize_model(model, "nf4", cpu_inference_repack=True)
    from tailor.lora import LoraConfig, add_lora

    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert evaluation_changes_gradients(model) > 1e-3
    assert any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m in quantized_layers(model).values())


# -------------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("kind", KINDS)
def test_merged_bf16_model_matches_the_adapter_on_the_quantized_base(kind, ids):
    model = prepared(kind)
    method = get_method(METHOD[kind])
    with pytest.raises(ValueError, match="Dequantize the base first"):
        merge_lora(model)
    assert all(not layer.merged_adapters for layer in lora_layers(model).values())  # untouched
    adapted = logits(model, ids)
    with disable_adapters(model):
        adapter_effect = (logits(model, ids) - adapted).abs().max().item()
    merged = method.merged(model)
    assert not lora_layers(merged) and not quantized_layers(merged)
    linears = [m for m in merged.modules() if isinstance(m, torch.nn.Linear)]
    assert all(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 for m in linears)
    diff = (logits(merged, ids) - adapted).abs().max().item()
    # bf16 rounding of the merged weights (documented in QLoraMethod's docstring); the adapter moves
    # the logits by far more, so the comparison can fail
    assert diff <= 0.02, diff
    assert adapter_effect > 10 * diff, (adapter_effect, diff)


def test_export_writes_a_plain_bf16_transformers_model(tmp_path, ids):
    model = prepared("nf4")
    expected = logits(model, ids)
    get_method("qlora-nf4").export(model, tmp_path / "model", None)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert "quantization_config" not in config
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.bfloat16)
    assert (logits(loaded, ids) - expected).abs().max().item() <= 0.02


# ------------------------------------------------------------------------------------------ save / attach
@pytest.mark.parametrize("kind", KINDS)
def test_save_then_attach_on_a_fresh_base_gives_the_same_logits(kind, tmp_path, ids):
    method = get_method(METHOD[kind])
    model = prepared(kind)
    expected = logits(model, ids)
    method.save(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    fresh = tiny_llama()
    cast_weights(fresh, torch.bfloat16)  # loaded in the dtype it trained in (precision bf16; buffers fp32)
    fresh.set_attn_implementation("eager")  # as prepare() set it for training on CPU
    tuned = method.attach(fresh, tmp_path / "adapter")
    assert tuned is fresh and len(quantized_layers(tuned)) == 14
    torch.testing.assert_close(logits(tuned, ids), expected, rtol=0, atol=0)


def test_the_adapter_loads_with_peft_on_a_bf16_base(tmp_path, ids):
    peft = pytest.importorskip("peft")
    model = prepared("nf4")
    quantized = logits(model, ids)
    get_method("qlora-nf4").save(model, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path / "adapter")
    ours = get_method("lora").attach(tiny_llama().to(torch.bfloat16), tmp_path / "adapter")
    peft_logits = logits(loaded, ids)
    assert (peft_logits - logits(ours, ids)).abs().max().item() <= 1e-2  # bf16 base, same adapter
    assert (peft_logits - quantized).abs().max().item() <= 0.2  # the same adapter, base not quantized


# ---------------------------------------------------------------------------------- messages and errors
def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails, find_spec: None
    for name in ("qlora-nf4", "qlora-int8"):
        with pytest.raises(MissingDependencyError, match=rf"method {name} needs bitsandbytes: pip install "
                           r"'tailor\[qlora\]' \(or pip install bitsandbytes\)"):
            get_method(name)
    with pytest.raises(ValueError, match="needs bitsandbytes"):  # the CLI reports ValueErrors as bad input
        import_bitsandbytes("qlora-int8")


def test_bitsandbytes_messages_are_not_shown():
    """In a fresh process (the import-time message is logged once per process): a 4-bit and an 8-bit eval
    forward print nothing, while other bitsandbytes warnings still do."""
    code = (
        "import torch\n"
        "from tailor.quant import quantize_model\n"
        "for kind in ('nf4', 'int8'):\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)).to(torch.bfloat16)\n"
        "    quantize_model(m, kind).eval()\n"
        "    assert type(m[0]).__name__ in ('Linear4bit', 'Linear8bitLt')\n"
        "    with torch.no_grad():\n"
        "        m(torch.ones(3, 64, dtype=torch.bfloat16))\n"
        "import bitsandbytes, logging\n"
        "logging.getLogger('bitsandbytes.autograd._functions').warning('other messages still show')\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "kernels" not in done.stderr and "MatMul8bitLt" not in done.stderr, done.stderr
    assert "other messages still show" in done.stderr


# ------------------------------------------------------------------------------------------- end to end
def test_tailor_train_with_qlora_nf4(tmp_path):
    from tailor.train import load_config, train

    model_dir = tiny_model_dir(tmp_path / "model")
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    config = load_config(method="qlora-nf4", model=str(model_dir), data=str(data), out=str(out), max_steps=3,
                         batch_size=8, rank=4, lora_alpha=8.0, eval_every=2, progress=False, num_threads=1)
    assert train(config) == out
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "qlora-nf4" and summary["steps"] == 3
    assert 0 < summary["trainable_params"] < summary["total_params"]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_same_code_path_on_cuda(kind, ids):
    model = llama().to("cuda", torch.bfloat16)
    quantize_model(model, kind)
    layer = model.model.layers[0].mlp.up_proj
    assert type(layer).__name__ == LAYER[kind] and layer.weight.device.type == "cuda"
    cpu = quantize_model(llama().to(torch.bfloat16), kind)
    gpu_logits = logits(model, ids.cuda()).cpu()
    assert (gpu_logits - logits(cpu, ids)).abs().max().item() <= 0.05
    assert frozen_weight_bytes(model).ratio == pytest.approx(frozen_weight_bytes(cpu).ratio, rel=0.02)
