"""PiSSA and OLoRA initialisations against PEFT: the same A0, B0 and residual base, and the trained adapter
saved for the original base (rank 2r) gives the trained model's fp32 logits there, in PEFT and in tailor."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from lora_cases import CASES, build, logits, make_input
from safetensors.torch import load_file

import tailor
from tailor.lora import LoraConfig, LoraConfigError, add_lora, delete_adapter, lora_layers, merge_lora

peft = pytest.importorskip("peft")

TOLERANCE = 1e-5
INIT_CASES = ["llama-all-linear-rslora", "gpt2-conv1d", "llama-embedding", "llama-patterns"]


def config_with(case_name: str, init: str) -> dict:
    return {**CASES[case_name].config, "init_lora_weights": init}


@torch.no_grad()
def as_if_trained(model: torch.nn.Module, seed: int = 3) -> None:
    """Move every adapter tensor by a deterministic step, as training would."""
    generator = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def peft_pissa_model(case_name: str, init: str, initial_dir):
    """PEFT's documented PiSSA flow: get_peft_model, then save the initial adapter with init True."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(build(CASES[case_name]), peft.LoraConfig(**config_with(case_name, init)))
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(initial_dir)
        model.peft_config["default"].init_lora_weights = init
    return model


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("case_name", INIT_CASES)
def test_init_and_conversion_equal_peft(case_name, init, tmp_path):
    x = make_input()
    base_logits = logits(build(CASES[case_name]), x)
    model = add_lora(build(CASES[case_name]), LoraConfig(**config_with(case_name, init)))
    reference = peft_pissa_model(case_name, init, tmp_path / "initial")
    # the same start: the same residual base and adapter tensors, and the model's output unchanged
    ours = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_embedding" not in k}
    theirs = {k.removeprefix("base_model.model.").replace(".default", ""): v
              for k, v in reference.state_dict().items() if "lora_embedding" not in k}
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[key], atol=1e-5, rtol=1e-5, msg=key)
    assert (logits(model, x) - base_logits).abs().max().item() <= 1e-4

    as_if_trained(model)
    with torch.no_grad():  # PEFT's adapter trained the same way (embedding B is random in both: copy it)
        ours_trainable = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
        peft_trainable = sorted((n, p) for n, p in reference.named_parameters() if p.requires_grad)
        for (_, p), (_, q) in zip(ours_trainable, peft_trainable, strict=True):
            q.copy_(p)
    trained = logits(model, x)
    assert (trained - base_logits).abs().max().item() > 1e-3  # the comparisons below can fail

    tailor.save_adapter(model, tmp_path / "tailor")
    saved_config = json.loads((tmp_path / "tailor" / "adapter_config.json").read_text())
    r, alpha = CASES[case_name].config["r"], CASES[case_name].config["lora_alpha"]
    assert saved_config["r"] == 2 * r and saved_config["init_lora_weights"] is True
    assert saved_config["lora_alpha"] == pytest.approx(alpha * (2**0.5 if saved_config["use_rslora"] else 2))
    metadata = json.loads((tmp_path / "tailor" / "tailor_metadata.json").read_text())
    assert metadata["conversion"]["r"] == [r, 2 * r]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(build(CASES[case_name]), tmp_path / "tailor").eval()
    assert (logits(in_peft, x) - trained).abs().max().item() <= TOLERANCE

    original = build(CASES[case_name])
    tailor.load_adapter(original, tmp_path / "tailor")
    assert (logits(original, x) - trained).abs().max().item() <= TOLERANCE
    merge_lora(original)
    assert (logits(original, x) - trained).abs().max().item() <= 1e-4

    # PEFT's own conversion of the same trained adapter writes the same tensors (its embedding keys aside:
    # PEFT's subtract_mutated_init keeps lora_A / lora_B keys only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(
            tmp_path / "initial"))
    peft_saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours_saved = load_file(tmp_path / "tailor" / "adapter_model.safetensors")
    for key, tensor in peft_saved.items():
        torch.testing.assert_close(ours_saved[key], tensor, atol=1e-6, rtol=1e-6, msg=key)
    assert {k for k in ours_saved if "lora_embedding" not in k} == set(peft_saved)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_decomposition_equals_peft(init):
    """tailor's decomposition of a weight equals PEFT's (pissa_niter_K draws from torch's RNG: same seed)."""
    from peft.utils.loftq_utils import _pissa_decomposition

    from tailor.lora.initialisation import decompose

    weight, r, scaling = torch.randn(48, 80, generator=torch.Generator().manual_seed(5)), 6, 0.75
    torch.manual_seed(11)
    a0, b0 = decompose(weight, r, scaling, init)
    torch.manual_seed(11)
    if init == "olora":
        q, upper = torch.linalg.qr(weight)
        want_a, want_b = upper[:r], q[:, :r]
    else:
        want_a, want_b, _ = _pissa_decomposition(weight.clone(), r, scaling, init)
    torch.testing.assert_close(a0, want_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b0, want_b, atol=1e-5, rtol=1e-5)


def test_pissa_niter_converts_exactly(tmp_path):
    case_name, x = "llama-all-linear-rslora", make_input()
    torch.manual_seed(0)
    model = add_lora(build(CASES[case_name]), LoraConfig(**config_with(case_name, "pissa_niter_4")))
    as_if_trained(model)
    trained = logits(model, x)
    tailor.save_adapter(model, tmp_path / "a")
    original = build(CASES[case_name])
    tailor.load_adapter(original, tmp_path / "a")
    assert (logits(original, x) - trained).abs().max().item() <= TOLERANCE


def test_delete_gives_the_base_back():
    case = CASES["gpt2-conv1d"]
    before = {k: v.clone() for k, v in build(case).state_dict().items()}
    model = add_lora(build(case), LoraConfig(**config_with("gpt2-conv1d", "pissa")))
    changed = model.transformer.h[0].attn.c_attn.base_layer.weight
    assert (changed - before["transformer.h.0.attn.c_attn.weight"]).abs().max() > 1e-2
    delete_adapter(model, "default")
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[key], atol=1e-5, rtol=1e-5, msg=key)


def test_quantized_base_is_refused_before_any_change():
    from tailor.quant import quantize_model

    model = quantize_model(build(CASES["llama-all-linear-rslora"]), "nf4", compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match="quantized; use method lora"):
        add_lora(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="pissa"))
    assert not lora_layers(model)
    for key, tensor in model.state_dict().items():
        if torch.is_tensor(tensor):
            assert torch.equal(tensor, before[key]), key


def test_rank_above_the_weight_is_refused():
    with pytest.raises(ValueError, match=r"r <= min\(d_in, d_out\)"):
        add_lora(build(CASES["llama-qv"]),
                 LoraConfig(r=64, target_modules=["q_proj"], init_lora_weights="olora"))


@pytest.mark.parametrize("values, fix", [
    ({"init_lora_weights": "pisa"}, "'pissa', 'pissa_niter_K'"),
    ({"init_lora_weights": "pissa_niter_x"}, "'olora'"),
    ({"init_lora_weights": "olora", "target_parameters": ["mlp.experts.down_proj"]}, "target_parameters"),
    ({"init_lora_weights": "pissa", "use_rslora": True, "rank_pattern": {"q_proj": 2}}, "drop use_rslora"),
])
def test_bad_init_is_one_clear_error(values, fix):
    with pytest.raises(LoraConfigError, match="init_lora_weights") as error:
        LoraConfig(**values)
    assert fix in str(error.value)


def test_unload_keeps_the_trained_model_or_gives_the_base_back():
    from tailor.lora import unload_lora

    case, x = CASES["llama-qv"], make_input()
    base_logits = logits(build(case), x)
    model = add_lora(build(case), LoraConfig(**config_with("llama-qv", "pissa")))
    as_if_trained(model)
    trained = logits(model, x)
    assert (logits(unload_lora(model, merge=True), x) - trained).abs().max().item() <= 1e-4

    model = add_lora(build(case), LoraConfig(**config_with("llama-qv", "olora")))
    as_if_trained(model)
    assert (logits(unload_lora(model, merge=False), x) - base_logits).abs().max().item() <= 1e-4
