"""tailor.lora.rows: a batch whose rows use different adapters (and none) equals each row computed alone."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, tiny_gpt2, tiny_llama

from tailor.lora import (
    LoraConfig,
    SlotError,
    add_lora,
    add_lora_slots,
    disable_adapters,
    lora_layers,
    set_active_adapters,
)
from tailor.lora.layer import adapter_tensors

# three adapters of different ranks, scalings and targets
ADAPTERS = {
    "a": LoraConfig(r=2, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    "b": LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "c": LoraConfig(r=4, lora_alpha=4, use_rslora=True, target_modules="all-linear", init_lora_weights=False,
                    rank_pattern={"down_proj": 2}),
}


def with_named_adapters(model):
    """The reference: the same base with the three adapters as ordinary named adapters."""
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        add_lora(model, config, name)
        with torch.no_grad():  # init_lora_weights=False leaves A and B random: make B clearly non-zero too
            generator = torch.Generator().manual_seed(seed)
            for layer in lora_layers(model).values():
                if name in layer.adapter_names:
                    for tensor in adapter_tensors(layer, name).values():
                        tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return model


def slot_weights(model, name):
    """{module path: (A, B, scaling)} of a named adapter: what a slot is filled with."""
    return {path: (layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
            for path, layer in lora_layers(model).items() if name in layer.adapter_names}


def row_logits(model, input_ids, name):
    if name is None:
        with disable_adapters(model), torch.no_grad():
            return model(input_ids).logits
    set_active_adapters(model, name)
    with torch.no_grad():
        return model(input_ids).logits


def test_mixed_batch_equals_each_row_alone(one_thread):
    dtype = torch.float32
    reference = with_named_adapters(tiny_llama(seed=3))
    base = tiny_llama(seed=3).to(dtype)
    slots = add_lora_slots(base, num_slots=4, max_rank=8)
    for slot, name in enumerate(ADAPTERS):
        slots.write(slot, slot_weights(reference, name))
    reference.to(dtype)  # named adapters stay fp32 (PEFT's semantics); the base weights follow dtype

    torch.manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (5, 9))
    names = ["c", None, "a", "b", "a"]
    index = [-1 if n is None else list(ADAPTERS).index(n) for n in names]
    with slots.rows(index), torch.no_grad():
        batched = base(input_ids).logits  # [5, 9, V]
    for row, name in enumerate(names):
        alone = row_logits(reference, input_ids[row : row + 1], name)[0]
        torch.testing.assert_close(batched[row], alone, atol=1e-5, rtol=1e-5, msg=f"row {row} ({name})")
    assert slots.index is None  # the block restores "no adapter"
    with torch.no_grad():
        bare = base(input_ids).logits
    torch.testing.assert_close(bare, row_logits(reference, input_ids, None), atol=0, rtol=0)


def test_uniform_rows_and_decode_shapes_match_the_named_adapter(one_thread):
    reference = with_named_adapters(tiny_llama(seed=4))
    base = tiny_llama(seed=4)
    slots = add_lora_slots(base, num_slots=2, max_rank=8)
    slots.write(1, slot_weights(reference, "b"))
    input_ids = torch.randint(0, VOCAB, (3, 1))  # one token per row: a decode step
    with slots.rows([1, 1, 1]), torch.no_grad():
        uniform = base(input_ids).logits
    assert slots.uniform == slots.num_slots  # reset after the block
    torch.testing.assert_close(uniform, row_logits(reference, input_ids, "b"), atol=1e-5, rtol=1e-5)

    slots.clear(1)
    with slots.rows([1, -1, 1]), torch.no_grad():
        cleared = base(input_ids).logits
    torch.testing.assert_close(cleared, row_logits(reference, input_ids, None), atol=0, rtol=0)


def test_decode_steps_reuse_row_copies_across_joins_leaves_and_slot_writes(one_thread):
    """Decode forwards (one token per row) keep each row's copied weights from step to step; after rows
    leave, move, join (more rows than before) and a slot is rewritten, every row still equals its
    adapter applied alone."""
    reference = with_named_adapters(tiny_llama(seed=7))
    base = tiny_llama(seed=7)
    slots = add_lora_slots(base, num_slots=3, max_rank=8)
    names = list(ADAPTERS)
    for slot, name in enumerate(names):
        slots.write(slot, slot_weights(reference, name))
    steps = [[0, 1, 2], [0, 1, 2], [2, 1], [2, 1, -1, 0, 0], "rewrite", [2, 1, -1, 0, 0], [0, 2, 2, 1]]
    torch.manual_seed(0)
    for index in steps:
        if index == "rewrite":  # slot 2 now holds adapter "a": rows holding copies of it must recopy
            slots.write(2, slot_weights(reference, "a"))
            names[2] = "a"
            continue
        input_ids = torch.randint(0, VOCAB, (len(index), 1))
        with slots.rows(index), torch.no_grad():
            batched = base(input_ids).logits
        for row, slot in enumerate(index):
            alone = row_logits(reference, input_ids[row : row + 1], None if slot < 0 else names[slot])[0]
            torch.testing.assert_close(batched[row], alone, atol=1e-5, rtol=1e-5, msg=f"{index} row {row}")
    bank = slots.layers["model.layers.0.self_attn.q_proj"].slot_bank
    assert bank.row_a.shape[0] == 5  # grown to the largest batch, rows kept
    slots.drop_row_copies()
    assert bank.row_a is None and bank.row_slots == []


def test_slots_refuse_what_does_not_fit_and_keep_named_adapters_working(one_thread):
    reference = with_named_adapters(tiny_llama(seed=5))
    base = tiny_llama(seed=5)
    slots = add_lora_slots(base, num_slots=2, max_rank=4)
    with pytest.raises(SlotError, match="rank 8, above max_lora_rank=4"):
        slots.write(0, slot_weights(reference, "b"))
    wrong = {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 7), torch.zeros(32, 2), 1.0)}
    with pytest.raises(SlotError, match="do not fit"):
        slots.write(0, wrong)
    with pytest.raises(SlotError, match="without slots"):
        slots.write(0, {"lm_head": (torch.zeros(2, 32), torch.zeros(VOCAB, 2), 1.0)})
    with pytest.raises(IndexError):
        slots.set_rows([0, 2])
    assert not any(layer.slot_bank.used for layer in slots.layers.values())  # nothing was written

    # a named adapter on a model with slots: applies to every row, and deleting it keeps the slots
    add_lora(base, LoraConfig(r=2, target_modules=["q_proj"]), "x")
    from tailor.lora import delete_adapter

    delete_adapter(base, "x")
    assert len(lora_layers(base)) == len(slots.layers)


def test_conv1d_layers_get_slots(one_thread):
    model = tiny_gpt2(seed=1)
    reference = add_lora(copy.deepcopy(model), LoraConfig(r=2, target_modules=["c_attn"],
                                                           init_lora_weights=False))
    with torch.no_grad():
        for layer in lora_layers(reference).values():
            layer.lora_B["default"].weight.normal_()
    slots = add_lora_slots(model, num_slots=1, max_rank=2, target_modules=["c_attn"])
    slots.write(0, slot_weights(reference, "default"))
    input_ids = torch.randint(0, VOCAB, (2, 6))
    with slots.rows([0, -1]), torch.no_grad():
        out = model(input_ids).logits
        torch.testing.assert_close(out[0], reference(input_ids[:1]).logits[0], atol=1e-5, rtol=1e-5)
        with disable_adapters(reference):
            torch.testing.assert_close(out[1], reference(input_ids[1:]).logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 12])  # decode (row copies); fewer / more than max_rank
@pytest.mark.parametrize("index", [[2, 0, -1], [1, 1, 1]], ids=["mixed", "uniform"])
def test_bf16_model_is_as_accurate_as_named_adapters(one_thread, bank_dtype, tokens, index):
    """On a bf16 base the per-row path (banks in fp32, or in bf16 as vLLM keeps them) is within the
    error the ordinary named adapters themselves have against the float32 computation."""
    exact_model = with_named_adapters(tiny_llama(seed=6))
    torch.manual_seed(11)
    input_ids = torch.randint(0, VOCAB, (3, tokens))
    names = [None if i < 0 else list(ADAPTERS)[i] for i in index]
    exact = torch.stack([row_logits(exact_model, input_ids[r : r + 1], n)[0] for r, n in enumerate(names)])
    base = tiny_llama(seed=6).to(torch.bfloat16)
    slots = add_lora_slots(base, num_slots=3, max_rank=8, dtype=bank_dtype)
    for slot, name in enumerate(ADAPTERS):
        slots.write(slot, slot_weights(exact_model, name))
    with slots.rows(index), torch.inference_mode():
        served = base(input_ids).logits.float()
    named_model = copy.deepcopy(exact_model).to(torch.bfloat16)
    named = torch.stack([row_logits(named_model, input_ids[r : r + 1], n)[0].float()
                         for r, n in enumerate(names)])
    named_error = (named - exact).abs().max().item()
    served_error = (served - exact).abs().max().item()
    assert served_error <= 2 * named_error + 1e-2, (served_error, named_error)
