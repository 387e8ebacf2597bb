"""The LoRA core on real tiny transformers models: add, disable, merge/unmerge, several adapters, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_cases import CASES, build, logits, make_input, randomise_trainable
from torch import nn

from tailor.lora import (
    LoraConfig,
    LoraConfigError,
    LoraLinear,
    LoraTargetError,
    UnsafeMergeError,
    active_adapters,
    add_lora,
    delete_adapter,
    disable_adapters,
    lora_configs,
    lora_layers,
    merge_lora,
    set_active_adapters,
    trainable_parameters,
    unload_lora,
    unmerge_lora,
)

ARCH_CASES = ["llama-qv", "qwen2-all-linear", "gpt2-conv1d", "bert-classifier", "llama-embedding"]


def adapted(case_name: str, seed: int = 7, name: str = "default", model=None):
    case = CASES[case_name]
    model = add_lora(model if model is not None else build(case), LoraConfig(**case.config), name)
    randomise_trainable(model, seed)
    return model


@pytest.mark.parametrize("case_name", ARCH_CASES)
def test_add_freezes_base_and_default_init_keeps_output(case_name):
    case, x = CASES[case_name], make_input()
    base = build(case)
    model = add_lora(copy.deepcopy(base), LoraConfig(**case.config))
    assert torch.equal(logits(model, x), logits(base, x))  # B (or embedding A) starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "modules_to_save" in n) for n in trainable)
    for layer in lora_layers(model).values():
        params = [p for name in layer.adapter_names for p in layer.adapter_parameters(name)]
        assert params and all(p.dtype == torch.float32 for p in params)
        assert not layer.base_layer.weight.requires_grad


@pytest.mark.parametrize("case_name", ARCH_CASES)
def test_disable_gives_exact_base_output(case_name):
    case, x = CASES[case_name], make_input()
    base_out = logits(build(case), x)
    model = adapted(case_name)
    adapted_out = logits(model, x)
    assert (adapted_out - base_out).abs().max() > 1e-3
    with disable_adapters(model):
        assert torch.equal(logits(model, x), base_out)
    assert torch.equal(logits(model, x), adapted_out)


@pytest.mark.parametrize("case_name", ARCH_CASES)
def test_merge_matches_unmerged_and_unmerge_restores_weights(case_name):
    x = make_input()
    model = adapted(case_name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged_out = logits(model, x)
    merge_lora(model)
    assert all(layer.merged_adapters == ["default"] for layer in lora_layers(model).values())
    assert torch.allclose(logits(model, x), unmerged_out, atol=1e-5)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, before[k], atol=1e-6), k
    assert torch.allclose(logits(model, x), unmerged_out, atol=1e-6)


@pytest.mark.parametrize("case_name", ["llama-qv", "gpt2-conv1d", "bert-classifier"])
def test_unload_leaves_plain_model_with_same_output(case_name):
    x = make_input()
    model = adapted(case_name)
    expected = logits(model, x)
    plain = unload_lora(model)
    assert not lora_layers(plain)
    names = [n for n, _ in plain.named_parameters()]
    assert not any("lora_" in n or "modules_to_save" in n or "base_layer" in n for n in names)
    assert type(plain).__name__ == type(build(CASES[case_name])).__name__
    assert torch.allclose(logits(plain, x), expected, atol=1e-5)


def test_bf16_base_gets_fp32_adapters_and_merges_in_fp32():
    case, x = CASES["llama-qv"], make_input()
    model = adapted("llama-qv", model=build(case).to(torch.bfloat16))
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer(torch.randn(2, layer.in_features, dtype=torch.bfloat16)).dtype == torch.bfloat16
    w = layer.base_layer.weight.detach().clone()
    expected = (w.float() + layer.delta_weight("default")).to(torch.bfloat16)  # one rounding, in fp32
    unmerged = logits(model, x)
    merge_lora(model)
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.base_layer.weight, expected)
    assert (logits(model, x) - unmerged).abs().max() < 0.1


def test_safe_merge_refuses_non_finite_and_leaves_model_untouched():
    model = adapted("llama-qv")
    layers = lora_layers(model)
    last = list(layers.values())[-1]
    last.lora_B["default"].weight.data[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    with pytest.raises(UnsafeMergeError, match="NaN/inf"):
        merge_lora(model, safe=True)
    assert all(not layer.merged_adapters for layer in layers.values())
    for k, v in model.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k


def test_several_adapters_stack_switch_and_delete():
    x = make_input()
    base_out = logits(build(CASES["llama-qv"]), x)
    model = adapted("llama-qv", seed=1, name="a")
    out_a = logits(model, x)
    adapted("llama-qv", seed=2, name="b", model=model)
    assert active_adapters(model) == ["b"]  # a newly added adapter becomes the active one
    out_b = logits(model, x)
    assert (out_a - out_b).abs().max() > 1e-3

    set_active_adapters(model, ["a", "b"])  # stacking: both deltas add up
    q = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    h = torch.randn(3, q.in_features)
    with torch.no_grad():
        expected = q.base_layer(h) + sum(q.lora_delta(h, [n]) for n in ("a", "b"))
        assert torch.allclose(q(h), expected, atol=1e-6)
    trainable_both = trainable_parameters(model)[0]
    set_active_adapters(model, "a")
    assert torch.allclose(logits(model, x), out_a, atol=1e-6)
    assert trainable_parameters(model)[0] * 2 == trainable_both  # only the active adapter trains

    delete_adapter(model, "a")
    assert active_adapters(model) == []
    set_active_adapters(model, "b")
    assert torch.allclose(logits(model, x), out_b, atol=1e-6)
    delete_adapter(model, "b")
    assert not lora_layers(model)  # layers without adapters go back to their base module
    assert torch.equal(logits(model, x), base_out)
    with pytest.raises(ValueError, match="Unknown adapter"):
        set_active_adapters(model, "a")


def test_switching_away_from_a_merged_adapter_is_refused():
    model = adapted("llama-qv", name="a")
    adapted("llama-qv", name="b", model=model)
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge_lora"):
        set_active_adapters(model, "a")
    with pytest.raises(ValueError, match="unmerge_lora"):
        delete_adapter(model, "b")
    with pytest.raises(ValueError, match="unmerge_lora"), disable_adapters(model):
        pass
    with pytest.raises(ValueError, match="unmerge_lora"):
        add_lora(model, LoraConfig(target_modules=["k_proj"]), "c")
    assert sorted(lora_configs(model)) == ["a", "b"]
    unmerge_lora(model)
    set_active_adapters(model, "a")


def test_two_adapters_with_their_own_classifier_cannot_both_be_active():
    model = adapted("bert-classifier", name="a")
    adapted("bert-classifier", name="b", model=model)
    with pytest.raises(ValueError, match="only one can be active"):
        set_active_adapters(model, ["a", "b"])


def test_lora_branch_under_bf16_autocast_and_gradient_checkpointing():
    case, x = CASES["llama-qv"], make_input()
    model = add_lora(build(case), LoraConfig(**case.config, lora_dropout=0.1))
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.enable_input_require_grads()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_no_dropout_module_when_p_is_zero():
    model = adapted("llama-qv")
    layer = next(iter(lora_layers(model).values()))
    assert isinstance(layer, LoraLinear) and isinstance(layer.lora_dropout["default"], nn.Identity)


@pytest.mark.parametrize("config, where", [
    ({"r": 4, "target_modules": ["q_proj", "v_prj"]}, "v_prj"),
    ({"r": 4, "target_modules": r".*\.nothing_here"}, "No module was targeted"),
    ({"r": 4, "target_modules": ["self_attn"]}, "cannot wrap"),
    ({"r": 4, "target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, "No module was targeted"),
    ({"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["no_such_head"]}, "no_such_head"),
])
def test_bad_targets_raise_listing_the_linear_layers(config, where):
    model = build(CASES["llama-qv"])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LoraTargetError, match=where) as info:
        add_lora(model, LoraConfig(**config))
    if "modules_to_save" not in config:
        assert "q_proj" in str(info.value) and "down_proj" in str(info.value)
    assert not lora_layers(model) and model.state_dict().keys() == before.keys()


@pytest.mark.parametrize("config, field", [
    ({"r": 0}, "r=0"),
    ({"lora_alpha": -1}, "lora_alpha"),
    ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"bias": "some"}, "bias"),
    ({"init_lora_weights": "pissa_niter"}, "init_lora_weights"),
    ({"target_modules": "q_proj(", "r": 4}, "regular expression"),
    ({"target_modules": r".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"target_modules": ["q_proj"], "layers_pattern": "layers"}, "layers_pattern"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
])
def test_config_validation_names_the_field(config, field):
    with pytest.raises(LoraConfigError, match=field.replace("(", r"\(")):
        LoraConfig(**config)


def test_config_from_dict_refuses_unknown_keys():
    with pytest.raises(LoraConfigError, match="lora_rank"):
        LoraConfig.from_dict({"lora_rank": 8})
    assert LoraConfig.from_dict({"r": 2}).r == 2


def test_all_linear_skips_output_head_and_classifier():
    llama = add_lora(build(CASES["llama-qv"]), LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in lora_layers(llama) and len(lora_layers(llama)) == 14
    bert = add_lora(build(CASES["bert-classifier"]), LoraConfig(target_modules="all-linear"))
    assert "classifier" not in lora_layers(bert)


def test_default_targets_follow_peft_table():
    model = add_lora(build(CASES["gpt2-conv1d"]), LoraConfig())
    assert sorted(lora_layers(model)) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
