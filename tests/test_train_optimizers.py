"""The optimizers of a run: LoRA+'s groups equal PEFT's create_loraplus_optimizer's, the 8-bit AdamW trains,
and the planner's optimizer-state figure is within 20% of the state measured after a step."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import VOCAB, synthetic_examples, tiny_gpt2, tiny_llama, tiny_model_dir
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tailor.config import ConfigError, TrainConfig
from tailor.lora import LoraConfig, add_lora
from tailor.train.optimizers import make_optimizer, optimizer_state_nbytes

peft = pytest.importorskip("peft")

# an embedding adapter, Conv1D adapters, trainable biases, and a trained LayerNorm copy (1-D, no decay)
LORAPLUS_CASE = {"r": 4, "lora_alpha": 8, "target_modules": ["wte", "c_attn", "c_proj"], "bias": "lora_only",
                 "modules_to_save": ["ln_f"]}


def groups_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, prefix: str = "") -> set:
    """{(lr, weight_decay, parameter names)} of the optimizer's non-empty groups, names without PEFT's
    prefix and adapter name."""
    names = {id(p): n.removeprefix(prefix).replace(".default", "") for n, p in model.named_parameters()}
    return {(round(g["lr"], 12), g["weight_decay"], frozenset(names[id(p)] for p in g["params"]))
            for g in optimizer.param_groups if g["params"]}


def test_loraplus_groups_equal_peft():
    from peft.optimizers import create_loraplus_optimizer

    config = TrainConfig(data="x.jsonl", lr=1e-3, loraplus_lr_ratio=16.0, loraplus_lr_embedding=1e-5,
                         weight_decay=0.1).validate()
    ours = add_lora(tiny_gpt2(), LoraConfig(**LORAPLUS_CASE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(**LORAPLUS_CASE))
    reference = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                          loraplus_lr_embedding=1e-5, loraplus_weight_decay=0.1)
    expected = groups_by_name(theirs, reference, "base_model.model.")
    got = groups_by_name(ours, make_optimizer(ours, config))
    assert got == expected
    assert {lr for lr, _, _ in got} == {1e-3, 1e-5, 16e-3}  # all three rates are there to compare


def test_loraplus_rates_follow_the_schedule():
    """A real training step at the schedule's rate 5e-4: A's group steps at it, B's at ratio x it (as
    transformers' LambdaLR scales PEFT's groups)."""
    from tailor.loss import CausalLMLoss, collate_batch
    from tailor.loss.replay import replay_loss_for
    from tailor.train.loop import train_step

    config = TrainConfig(data="x.jsonl", lr=1e-3, loraplus_lr_ratio=4.0, precision="fp32").validate()
    model = add_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="gaussian"))
    optimizer = make_optimizer(model, config)
    batch = collate_batch(synthetic_examples()[:4], 0, torch.device("cpu"))
    train_step(CausalLMLoss(model, 1024, True, replay_loss_for("ce")), optimizer, [batch], 5e-4, config)
    layer = model.model.layers[0].self_attn.q_proj
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert rates[id(layer.lora_A["default"].weight)] == 5e-4
    assert rates[id(layer.lora_B["default"].weight)] == 2e-3
    assert float(layer.lora_B["default"].weight.detach().abs().max()) > 0  # the step was taken


def wide_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)).eval()


@pytest.mark.parametrize("optimizer", ["adamw", "adamw-8bit", "paged-adamw-8bit"])
def test_planned_optimizer_state_within_20_percent_of_measured(tmp_path, optimizer):
    """The planner counts state per tensor (tailor.plan.optimizer: 8-bit blocks with an fp32 absmax each,
    small tensors in 32 bits); measured: the bytes of the state tensors after one real step."""
    from tailor.plan.catalogue import resolve_model
    from tailor.plan.memory import estimate_memory
    from tailor.plan.planner import train_config_setup

    model_dir = tiny_model_dir(tmp_path / "model", builder=lambda seed, **kw: wide_llama())
    config = TrainConfig(data="x.jsonl", model=str(model_dir), rank=16, optimizer=optimizer,
                         precision="fp32").validate()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    add_lora(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    opt = make_optimizer(model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: paged optimizers fall back to plain ones on a CPU
        tokens = torch.randint(0, VOCAB, (2, 16))
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
    measured = optimizer_state_nbytes(opt)
    breakdown = estimate_memory(resolve_model(str(model_dir)), train_config_setup(config, "cpu"), "cpu")
    planned = breakdown.optimizer_state + breakdown.host_optimizer_state
    assert abs(planned - measured) <= 0.2 * measured, (planned, measured)
    if optimizer != "adamw":  # the 8-bit state is a small share of adamw's: the test tells them apart
        adamw_state = sum(2 * 4 * p.numel() for p in model.parameters() if p.requires_grad)
        assert measured < 0.4 * adamw_state


@pytest.mark.parametrize("values, problem", [
    ({"optimizer": "adam8bit"}, "optimizer: 'adam8bit' is not one of adamw, adamw-8bit, paged-adamw-8bit"),
    ({"loraplus_lr_ratio": -1.0}, "loraplus_lr_ratio: -1.0 must be > 0"),
    ({"loraplus_lr_ratio": 16.0, "method": "full"}, "method full has none"),
    ({"optimizer": "adamw-8bit", "strategy": "fsdp"}, "use strategy ddp or optimizer adamw"),
    ({"init_lora_weights": "svd"}, "init_lora_weights: 'svd' is not one of true, false, gaussian, pissa"),
    ({"init_lora_weights": "olora", "method": "qlora-nf4"}, "qlora-nf4 keeps them quantized"),
    ({"init_lora_weights": "pissa", "replay_ratio": 0.2, "replay_loss": "kl"}, "use replay_loss ce"),
])
def test_bad_choices_are_one_clear_error(values, problem):
    with pytest.raises(ConfigError) as error:
        TrainConfig(data="x.jsonl", **values).validate()
    assert problem in str(error.value)


def test_init_lora_weights_from_the_command_line():
    from tailor.methods.lora import lora_config_for

    model = tiny_gpt2()
    for written, value in (("true", True), ("False", False), ("pissa_niter_4", "pissa_niter_4")):
        config = TrainConfig(data="x.jsonl", init_lora_weights=written).validate()
        assert lora_config_for(model, config).init_lora_weights == value


def test_plan_takes_the_training_spelling_of_the_optimizer():
    from tailor.plan.catalogue import resolve_model
    from tailor.plan.planner import make_setup

    arch = resolve_model("SmolLM2-135M")
    assert make_setup(arch, optimizer="paged-adamw-8bit").optimizer == "adamw-8bit-paged"
    assert make_setup(arch, optimizer="adamw-8bit").optimizer == "adamw-8bit"
