"""Adapters move between tailor and PEFT without conversion: same files, same fp32 logits (<= 1e-5)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from lora_cases import CASES, build, logits, make_input, randomise_trainable
from safetensors import safe_open

import tailor
from tailor.lora import LoraConfig, add_lora, trainable_parameters

peft = pytest.importorskip("peft")

TOLERANCE = 1e-5


def peft_model(case, seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(build(case, seed), peft.LoraConfig(**case.config))


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_tailor_adapter_loads_in_peft(case_name, tmp_path):
    case, x = CASES[case_name], make_input()
    model = add_lora(build(case), LoraConfig(**case.config))
    randomise_trainable(model)
    expected = logits(model, x)
    tailor.save_adapter(model, tmp_path / "adapter")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build(case), tmp_path / "adapter").eval()
    got = logits(loaded, x)
    assert (got - expected).abs().max().item() <= TOLERANCE
    # the adapter really changes the output, so the comparison above can fail
    assert (logits(build(case), x) - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_peft_adapter_loads_in_tailor(case_name, tmp_path):
    case, x = CASES[case_name], make_input()
    source = peft_model(case)
    randomise_trainable(source)
    source.eval()
    expected = logits(source, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source.save_pretrained(tmp_path / "peft")

    model = build(case)
    assert tailor.load_adapter(model, tmp_path / "peft") == "default"
    got = logits(model, x)
    assert (got - expected).abs().max().item() <= TOLERANCE
    assert (logits(build(case), x) - expected).abs().max().item() > 1e-3


def test_saved_files_look_like_peft(tmp_path):
    case = CASES["llama-qv"]
    model = add_lora(build(case), LoraConfig(**case.config))
    tailor.save_adapter(model, tmp_path / "a")
    source = peft_model(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source.save_pretrained(tmp_path / "p")

    ours_text = (tmp_path / "a" / "adapter_config.json").read_text()
    ours = json.loads(ours_text)
    theirs = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert list(ours) == sorted(ours)  # sorted keys
    for key in ("peft_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "fan_in_fan_out",
                "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform", "use_dora"):
        assert ours[key] == theirs[key], key
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])

    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        our_keys, metadata = set(f.keys()), f.metadata()
    with safe_open(str(tmp_path / "p" / "adapter_model.safetensors"), "pt") as f:
        their_keys = set(f.keys())
    assert metadata == {"format": "pt"}
    assert our_keys == their_keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in our_keys


COUNT_CASES = ["llama-qv", "llama-all-linear-rslora", "llama-patterns", "llama-embedding", "qwen2-all-linear",
               "gpt2-conv1d", "gpt2-all-linear-bias", "bert-classifier", "bert-seq-cls-all-linear"]


@pytest.mark.parametrize("case_name", COUNT_CASES)
def test_trainable_counts_match_peft(case_name):
    case = CASES[case_name]
    ours = trainable_parameters(add_lora(build(case), LoraConfig(**case.config)))
    assert ours == peft_model(case).get_nb_trainable_parameters()


def test_all_linear_bert_with_modules_to_save_counts_match_peft():
    config = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "modules_to_save": ["classifier"]}
    ours = trainable_parameters(add_lora(build(CASES["bert-classifier"]), LoraConfig(**config)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(CASES["bert-classifier"]), peft.LoraConfig(**config))
    assert ours == theirs.get_nb_trainable_parameters()


def test_dropout_and_trained_adapter_round_trip_through_peft(tmp_path):
    """A few real optimizer steps (dropout on) instead of random B, then PEFT reproduces the logits."""
    case, x = CASES["llama-qv"], make_input()
    model = add_lora(build(case), LoraConfig(**case.config, lora_dropout=0.1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    expected = logits(model, x)
    tailor.save_adapter(model, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build(case), tmp_path / "a").eval()
    assert (logits(loaded, x) - expected).abs().max().item() <= TOLERANCE
    assert (logits(build(case), x) - expected).abs().max().item() > 1e-4
