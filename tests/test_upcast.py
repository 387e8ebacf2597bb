"""A frozen base stored in bf16 and computed in fp32 (tailor.models.upcast, `base_dtype`): the function is
fp32 compute on the bf16-rounded weights, LoRA trains on it as on that reference, backward keeps no fp32
copy of a frozen weight, and a `tailor train --precision fp32 --base-dtype bf16` run delivers an adapter
PEFT loads with the same logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import VOCAB, tiny_llama, tiny_model_dir, write_arithmetic_jsonl
from torch import nn

from tailor.lora import LoraConfig, add_lora
from tailor.models.upcast import UpcastEmbedding, UpcastLinear, restore_full_precision, store_low_precision

pytestmark = pytest.mark.usefixtures("one_thread")


def rounded_reference(model: nn.Module) -> nn.Module:
    """An fp32 copy of `model` whose linear and embedding weights are the bf16-rounded ones."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for module in reference.modules():
            if type(module) in (nn.Linear, nn.Embedding):
                module.weight.data = module.weight.data.to(torch.bfloat16).float()
    return reference


def ids(rows: int = 2, width: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, width), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied", [False, True])
def test_logits_equal_fp32_compute_on_bf16_rounded_weights(tied):
    model = tiny_llama(tie_word_embeddings=tied)
    reference = rounded_reference(model)
    upcast = store_low_precision(copy.deepcopy(model))
    assert isinstance(upcast.lm_head, UpcastLinear) and isinstance(upcast.model.embed_tokens, UpcastEmbedding)
    assert upcast.lm_head.weight.dtype == torch.bfloat16 and upcast.model.norm.weight.dtype == torch.float32
    assert (upcast.lm_head.weight is upcast.model.embed_tokens.weight) == tied  # a tie stays a tie
    with torch.no_grad():
        got, want = upcast(ids()).logits, reference(ids()).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def with_lora(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # a moved adapter: B = 0 would give A no gradient
                moved = torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2))
                parameter.copy_(moved * 0.1)
    return model


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    x = ids()
    loss = model(x, labels=x).loss
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_lora_gradients_equal_the_reference():
    model = tiny_llama()
    reference = with_lora(rounded_reference(model))
    upcast = with_lora(store_low_precision(copy.deepcopy(model)))
    assert all(p.dtype == torch.float32 for n, p in upcast.named_parameters() if "lora_" in n)
    got, want = lora_grads(upcast), lora_grads(reference)
    assert got.keys() == want.keys() and len(got) == 2 * 7 * 2  # A and B of 7 linears in 2 layers
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_backward_saves_no_fp32_copy_of_a_frozen_weight():
    upcast = with_lora(store_low_precision(tiny_llama()))
    frozen = {id(m.weight): m.weight for m in upcast.modules() if isinstance(m, UpcastLinear)}
    shapes = {tuple(w.shape) for w in frozen.values()}
    pointers = {w.data_ptr() for w in frozen.values()}
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    x = ids()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = upcast(x, labels=x).loss
    copies = [t for t in saved if t.dtype == torch.float32 and tuple(t.shape) in shapes
              and t.data_ptr() not in pointers]
    assert not copies, f"fp32 copies of frozen weights saved for backward: {[c.shape for c in copies]}"
    kept = {t.data_ptr() for t in saved if t.dtype == torch.bfloat16}
    # each frozen weight is saved as it is stored (bf16, no copy); the first block's q/k/v read an input
    # that needs no gradient (frozen embedding and norm), so nothing is saved for them at all
    first = upcast.model.layers[0].self_attn
    unsaved = {getattr(first, n).base_layer.weight.data_ptr() for n in ("q_proj", "k_proj", "v_proj")}
    assert pointers - kept == unsaved
    loss.backward()


def test_restore_full_precision_gives_plain_fp32_layers():
    model = restore_full_precision(store_low_precision(tiny_llama()))
    assert {type(m) for m in model.modules()} & {UpcastLinear, UpcastEmbedding} == set()
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_lean_load_stores_bf16_as_it_reads(tmp_path):
    from tailor.models import load_model

    directory = tiny_model_dir(tmp_path / "model")
    plain, _ = load_model(str(directory), dtype=torch.float32, device="cpu")
    lean, _ = load_model(str(directory), dtype=torch.float32, device="cpu", stored=torch.bfloat16)
    assert lean.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert lean.model.layers[0].input_layernorm.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(lean(ids()).logits, rounded_reference(plain)(ids()).logits, rtol=1e-5,
                                   atol=1e-5)


def test_base_dtype_resolution():
    from tailor.hardware import resolve_base_dtype
    from tailor.names import BASE_DTYPE_AT_FP32

    assert resolve_base_dtype("auto", "fp32").resolved == BASE_DTYPE_AT_FP32  # the measured choice
    assert resolve_base_dtype("bf16", "fp32").resolved == "bf16"
    assert resolve_base_dtype("auto", "bf16").resolved == "bf16"
    assert resolve_base_dtype("fp32", "fp32").resolved == "fp32"
    assert resolve_base_dtype("auto", "fp32", float_base=False).resolved == "fp32"  # QLoRA, full
    assert resolve_base_dtype("auto", "fp32", sharded=True).resolved == "fp32"  # FSDP: one dtype
    with pytest.raises(ValueError, match="FSDP"):
        resolve_base_dtype("bf16", "fp32", sharded=True)
    with pytest.raises(ValueError, match="auto, bf16, fp32"):
        resolve_base_dtype("fp16", "fp32")


def test_bad_base_dtype_is_one_clear_error(tmp_path):
    from typer.testing import CliRunner

    from tailor.cli import app

    result = CliRunner().invoke(app, ["train", "--data", "builtin:support", "--base-dtype", "fp16",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "base_dtype: 'fp16' is not one of auto, bf16, fp32" in result.output
    assert "Traceback" not in result.output


def test_planner_counts_the_frozen_base_as_stored():
    from tailor.config import TrainConfig
    from tailor.names import BASE_DTYPE_AT_FP32
    from tailor.plan.planner import train_config_setup

    setups = {b: train_config_setup(TrainConfig(precision="fp32", base_dtype=b), "cpu")
              for b in ("auto", "bf16", "fp32")}
    assert setups["auto"].base_dtype == BASE_DTYPE_AT_FP32
    assert setups["bf16"].base_dtype == "bf16" and setups["fp32"].base_dtype == "fp32"
    assert train_config_setup(TrainConfig(precision="fp32", method="qlora-nf4"), "cpu").base_dtype is None

    from tailor.plan.catalogue import resolve_model
    from tailor.plan.memory import frozen_weight_bytes

    arch = resolve_model("SmolLM2-135M")
    halved = frozen_weight_bytes(arch, setups["fp32"]) / 2
    assert frozen_weight_bytes(arch, setups["bf16"]) == pytest.approx(halved)


def test_train_fp32_with_bf16_base_records_it_and_peft_loads_the_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    from typer.testing import CliRunner

    from tailor.adapters import load_adapter
    from tailor.cli import app
    from tailor.models import load_model

    model_dir = tiny_model_dir(tmp_path / "model")
    data = write_arithmetic_jsonl(tmp_path / "train.jsonl", n=24)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--model", str(model_dir), "--data", str(data),
                                      "--out", str(out), "--precision", "fp32", "--base-dtype", "bf16",
                                      "--max-steps", "3", "--rank", "4", "--lora-alpha", "8", "--lr", "1e-2",
                                      "--batch-size", "4", "--set", "num_threads=1",
                                      "--set", "progress=false"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_dtype"]["resolved"] == "bf16" and summary["precision"]["resolved"] == "fp32"
    assert "base_dtype: bf16" in (out / "config.yaml").read_text()
    assert summary["frozen_weight_bytes"] < summary["total_params"] * 3  # ~2 bytes a frozen weight, not 4

    tailor_model, _ = load_model(str(model_dir), dtype=torch.float32, device="cpu", stored=torch.bfloat16)
    load_adapter(tailor_model, out / "adapter")
    base, _ = load_model(str(model_dir), dtype=torch.float32, device="cpu")
    peft_model = peft.PeftModel.from_pretrained(rounded_reference(base), out / "adapter").eval()
    with torch.no_grad():
        got, want, bare = tailor_model(ids()).logits, peft_model(ids()).logits, base(ids()).logits
    assert (got - bare).abs().max() > 1e-3  # the adapter moved the logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
