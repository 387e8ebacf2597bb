"""Training methods as objects: one name list, what each makes trainable, in which dtype."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from tailor.config import TrainConfig
from tailor.methods import METHODS, get_method, method_spec


def _config(method: str, **values) -> TrainConfig:
    return TrainConfig(method=method, data="x.jsonl", rank=4, lora_alpha=8.0, **values).validate()


def test_one_list_of_names_everywhere():
    from tailor.plan.memory import TrainingSetup

    assert METHODS == ("lora", "full", "qlora-nf4", "qlora-int8")
    for name in METHODS:
        assert method_spec(name).name == name
        TrainingSetup(method=name)  # the planner accepts every name
    with pytest.raises(ValueError, match="lora, full, qlora-nf4, qlora-int8"):
        method_spec("dora")
    assert TrainConfig(method="full", data="x").lr == method_spec("full").default_lr == 2e-5
    assert TrainConfig(method="lora", data="x").lr == 2e-4


def test_lora_trains_only_adapters_on_a_bf16_base_and_keeps_rotary_in_fp32():
    model = get_method("lora").prepare(tiny_llama(), _config("lora", precision="bf16"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if not p.requires_grad)
    # transformers keeps inv_freq in fp32 when it loads a bf16 model: training must see the same positions
    fresh = tiny_llama()
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq, rtol=0,
                               atol=0)
    assert model.config.use_cache is False


def test_full_trains_every_weight_in_fp32():
    model = get_method("full").prepare(tiny_llama(), _config("full"))
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert get_method("full").deliverable_dir("run").name == "model"
    assert get_method("lora").deliverable_dir("run").name == "adapter"
