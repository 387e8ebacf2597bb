"""Mixture-of-experts (transformers 5: experts as 3-D parameters): LoRA on the experts and routers in PEFT's
`target_parameters` format. A tiny Mixtral and a tiny Qwen3-MoE; PEFT is the reference throughout.

Tolerances: logits 1e-5 (measured 0.0 against PEFT: the same W + dW before the same kernels), merged model
1e-5 (fp32 rounding of W + dW), gradients 1e-6 after one SGD step of lr 1 (the same sums, other orders).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_mixtral, tiny_model_dir, tiny_qwen3_moe
from lora_cases import logits, make_input, randomise_trainable

from tailor.adapters.format import adapter_state_dict, load_adapter, save_adapter
from tailor.lora import (
    LoraConfig,
    add_lora,
    add_lora_slots,
    lora_configs,
    lora_layers,
    trainable_parameters,
    unload_lora,
)
from tailor.lora.experts import LoraParam, param_wrappers

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")
MOE = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe}
ALL_LINEAR = {"r": 2, "lora_alpha": 4, "target_modules": "all-linear"}
DOWN_ONLY = {"r": 3, "lora_alpha": 6, "target_modules": ["q_proj"],
             "target_parameters": ["mlp.experts.down_proj"]}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def tailor_adapter(arch: str, config: dict, seed: int = 7):
    model = add_lora(MOE[arch](), LoraConfig(**config))
    randomise_trainable(model, seed)
    return model


def peft_model(arch: str, directory: Path, trainable: bool = False):
    return _quiet(peft.PeftModel.from_pretrained, MOE[arch](), str(directory), is_trainable=trainable).eval()


@pytest.mark.parametrize("arch", sorted(MOE))
def test_all_linear_adapts_experts_and_router_as_peft_does(arch):
    model = add_lora(MOE[arch](), LoraConfig(**ALL_LINEAR))
    config = lora_configs(model)["default"]
    assert config.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]  # short names, as PEFT writes
    assert config.target_parameters == ["down_proj", "gate.weight", "gate_up_proj"]
    assert config.rank_pattern == {r".*\.gate_up_proj": 4}
    assert config.alpha_pattern == {r".*\.gate_up_proj": 8}
    expected = {f"model.layers.{i}.mlp.{p}" for i in range(2)
                for p in ("experts.gate_up_proj", "experts.down_proj", "gate.weight")}
    assert set(param_wrappers(model)) == expected
    reference = _quiet(peft.get_peft_model, MOE[arch](), peft.LoraConfig(**ALL_LINEAR))
    assert trainable_parameters(model) == tuple(reference.get_nb_trainable_parameters())
    ours = {k: tuple(v.shape) for k, v in adapter_state_dict(model).items()}
    theirs = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(reference).items()}
    assert ours == theirs  # the same keys (PEFT's nesting: gate_up_proj under base_layer) and shapes


@pytest.mark.parametrize("config", [ALL_LINEAR, DOWN_ONLY], ids=["all-linear", "down-proj-only"])
@pytest.mark.parametrize("arch", sorted(MOE))
def test_peft_loads_a_tailor_moe_adapter_with_equal_logits(arch, config, tmp_path):
    model = tailor_adapter(arch, config)
    save_adapter(model, tmp_path / "a")
    ids = make_input()
    ours = logits(model, ids)
    torch.testing.assert_close(logits(peft_model(arch, tmp_path / "a"), ids), ours, atol=1e-5, rtol=1e-5)
    assert (logits(MOE[arch](), ids) - ours).abs().max() > 1e-2  # the adapter matters
    back = MOE[arch]()
    load_adapter(back, tmp_path / "a")
    torch.testing.assert_close(logits(back, ids), ours, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("config", [ALL_LINEAR, DOWN_ONLY], ids=["all-linear", "down-proj-only"])
@pytest.mark.parametrize("arch", sorted(MOE))
def test_a_peft_moe_adapter_loads_with_equal_logits(arch, config, tmp_path):
    reference = _quiet(peft.get_peft_model, MOE[arch](), peft.LoraConfig(**config, init_lora_weights=False))
    reference.eval().save_pretrained(tmp_path / "p")
    model = MOE[arch]()
    load_adapter(model, tmp_path / "p")
    assert any(isinstance(layer, LoraParam) for layer in lora_layers(model).values())
    ids = make_input()
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(MOE))
def test_expert_gradients_equal_peft(arch, tmp_path):
    """One SGD step (lr 1) on the same batch from the same adapter gives the same adapter as PEFT's."""
    model = tailor_adapter(arch, ALL_LINEAR)
    save_adapter(model, tmp_path / "a")
    reference = peft_model(arch, tmp_path / "a", trainable=True)
    ids = make_input()
    before = adapter_state_dict(model)
    for m in (model, reference):
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]
        m(input_ids=ids, labels=ids).loss.backward()
        torch.optim.SGD(params, lr=1.0).step()
    ours = adapter_state_dict(model)
    theirs = peft.get_peft_model_state_dict(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=1e-5, msg=key)
    moved = [k for k in ours if "experts" in k and (ours[k] - before[k]).abs().max() > 1e-6]
    assert len(moved) == 8  # gradients reached A and B of both expert parameters in both layers


@pytest.mark.parametrize("arch", sorted(MOE))
def test_training_steps_lower_the_loss(arch):
    model = add_lora(MOE[arch](), LoraConfig(**ALL_LINEAR)).train()
    ids = make_input()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("arch", sorted(MOE))
def test_merge_gives_the_adapters_logits(arch):
    model = tailor_adapter(arch, ALL_LINEAR)
    ids = make_input()
    expected = logits(model, ids)
    plain = unload_lora(model, merge=True, safe=True)
    assert not lora_layers(plain)
    assert set(plain.state_dict()) == set(MOE[arch]().state_dict())
    torch.testing.assert_close(logits(plain, ids), expected, atol=1e-5, rtol=1e-5)


def test_tailor_merge_of_an_moe_adapter_passes_its_float64_check(tmp_path):
    """`tailor merge` used to fail in its float64 check (grouped_mm has no float64) and missed the experts."""
    from tailor.export import merge_adapter
    from tailor.models import load_model

    model_dir = tiny_model_dir(tmp_path / "model", builder=tiny_mixtral)
    base, _ = load_model(str(model_dir), device="cpu")
    add_lora(base, LoraConfig(**ALL_LINEAR, base_model_name_or_path=str(model_dir)))
    randomise_trainable(base)
    adapter = save_adapter(base, tmp_path / "adapter")
    result = merge_adapter(adapter, tmp_path / "merged")
    assert result.check == "float64" and result.max_abs_diff <= 1e-4
    from transformers import AutoModelForCausalLM

    ids = make_input()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    reference = _quiet(peft.PeftModel.from_pretrained,
                       AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), str(adapter))
    torch.testing.assert_close(logits(merged, ids), logits(reference.eval(), ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", sorted(MOE))
def test_slots_give_each_row_its_own_moe_adapter(arch, tmp_path):
    models = {}
    for i, config in enumerate([ALL_LINEAR, DOWN_ONLY]):
        models[i] = tailor_adapter(arch, {**config, "r": 2}, seed=i)
        save_adapter(models[i], tmp_path / str(i))
    base = MOE[arch]()
    slots = add_lora_slots(base, num_slots=2, max_rank=4)
    from tailor.serve.adapters import read_for_slots

    for i in range(2):
        weights, rank = read_for_slots(tmp_path / str(i), slots)
        assert rank == (4 if i == 0 else 2)  # all-linear: gate_up_proj at twice the rank, as PEFT
        slots.write_prepared(i, weights)
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), slots.rows([1, -1, 0]):
        mixed = base(ids).logits
    torch.testing.assert_close(mixed[0], logits(models[1], ids[:1])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], logits(MOE[arch](), ids[1:2])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], logits(models[0], ids[2:])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(MOE))
def test_an_adapter_reads_the_same_while_a_forward_runs(arch, tmp_path):
    """A server reads adapters in a loader thread while the engine runs forwards, and a forward moves the
    adapted expert parameters out of the module (parametrization) until it ends: reading an adapter then
    must map its saved paths exactly as it does between forwards (it once refused the adapter)."""
    from tailor.lora.experts import param_wrappers
    from tailor.serve.adapters import read_for_slots

    for i, config in enumerate([ALL_LINEAR, DOWN_ONLY]):
        save_adapter(tailor_adapter(arch, {**config, "r": 2}, seed=i), tmp_path / str(i))
    base = MOE[arch]()
    slots = add_lora_slots(base, num_slots=2, max_rank=4)
    slots.write_prepared(0, read_for_slots(tmp_path / "0", slots)[0])
    between = read_for_slots(tmp_path / "1", slots)[0]
    during = []
    experts = next(layer.get_base_layer() for layer in param_wrappers(base).values())

    def read_now(*_) -> None:
        during.append(read_for_slots(tmp_path / "1", slots)[0])

    hook = experts.register_forward_pre_hook(read_now)
    with torch.no_grad(), slots.rows([0]):
        base(torch.randint(0, VOCAB, (1, 4)))
    hook.remove()
    assert during and sorted(during[0]) == sorted(between)
    for key, tensors in between.items():
        for got, want in zip(during[0][key], tensors, strict=True):
            torch.testing.assert_close(got, want)


class _IdTokenizer:
    pad_token_id, eos_token_id = 0, 127

    def get_vocab(self) -> dict:
        return {}

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("arch", sorted(MOE))
def test_serving_a_mixed_batch_equals_peft_greedy(arch, tmp_path):
    from tailor.serve.adapters import AdapterManager
    from tailor.serve.engine import Engine
    from tailor.serve.sampling import SamplingParams

    root = tmp_path / "adapters"
    for seed, (name, config) in enumerate({"all": ALL_LINEAR, "down": {**DOWN_ONLY, "r": 2}}.items()):
        model = add_lora(MOE[arch](), LoraConfig(**config))
        randomise_trainable(model, seed)
        save_adapter(model, root / name)
    model = MOE[arch](seed=0)
    manager = AdapterManager(model, root, max_loras=2, max_lora_rank=4)
    engine = Engine(model, _IdTokenizer(), adapters=manager, max_batch=3)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 127, (n,), generator=generator).tolist() for n in (5, 9, 7, 4)]
    names = ["all", "down", None, "down"]
    requests = engine.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True), adapters=names)
    for request, prompt, name in zip(requests, prompts, names, strict=True):
        reference = MOE[arch]() if name is None else peft_model(arch, root / name)
        assert request.output_ids == _greedy(reference, prompt, 5), name


@pytest.mark.parametrize("arch", sorted(MOE))
def test_planner_counts_the_experts(arch, tmp_path):
    """Total parameters (every expert) and all-linear's LoRA parameters (experts and router included, as
    PEFT adapts them) equal the tiny models' actual counts."""
    from tailor.plan.catalogue import architecture_from_hf_config
    from tailor.plan.params import count_parameters, lora_parameters

    model = MOE[arch]()
    shape = architecture_from_hf_config(model.config.to_dict(), "config.json")
    assert shape.num_experts == 4
    assert count_parameters(shape).total == sum(p.numel() for p in model.parameters())
    for rank in (2, 8):
        adapted = add_lora(MOE[arch](), LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear"))
        assert lora_parameters(shape, rank, "all-linear") == trainable_parameters(adapted)[0]
    adapted = add_lora(MOE[arch](), LoraConfig(r=4, target_modules=["q_proj"],
                                               target_parameters=["gate_up_proj", "down_proj"]))
    targets = ["q_proj", "gate_up_proj", "down_proj"]
    assert lora_parameters(shape, 4, targets) == trainable_parameters(adapted)[0]
    model.config.to_json_file(tmp_path / "config.json")
    from typer.testing import CliRunner

    from tailor.cli import app

    result = CliRunner().invoke(app, ["plan", "--model", str(tmp_path / "config.json"), "--method", "lora",
                                      "--target-modules", "all-linear", "--rank", "2"])
    assert result.exit_code == 0, result.output  # the memory estimate runs for an MoE model too
