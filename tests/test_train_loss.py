"""supervised_loss == the transformers model's own loss, computed only on supervised rows."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, prefixed_batch, tiny_gpt2, tiny_llama, tiny_qwen2

from tailor.lora import LoraConfig, add_lora, lora_layers
from tailor.loss import MIN_SHARED_PREFIX, KLReplay, count_supervised, shared_prefix_length, supervised_loss


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (3, 14), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 9:] = 0  # right padding
    attention_mask[2, 11:] = 0
    labels = input_ids.clone()
    labels[:, :5] = -100  # prompt tokens carry no loss
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, tiny_gpt2], ids=["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_matches_transformers_loss_and_gradients(build, chunk_size):
    model = build()
    batch = _batch()
    loss_sum, n = supervised_loss(model, batch, chunk_size=chunk_size)
    assert n == count_supervised(batch["labels"]) == int((batch["labels"][:, 1:] != -100).sum())
    (loss_sum / n).backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    reference = model(**batch).loss
    reference.backward()
    torch.testing.assert_close(loss_sum / n, reference, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_is_close_to_fp32():
    model = tiny_llama()
    batch = _batch(1)
    with torch.no_grad():
        reference = model(**batch).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_sum, n = supervised_loss(model, batch)
    assert loss_sum.dtype == torch.float32  # logits are upcast before the softmax
    torch.testing.assert_close(loss_sum / n, reference, rtol=2e-2, atol=2e-2)


def test_no_supervised_tokens_gives_zero_with_a_graph():
    model = tiny_llama()
    batch = _batch()
    batch["labels"][:] = -100
    loss_sum, n = supervised_loss(model, batch)
    assert n == 0 and float(loss_sum.detach()) == 0.0
    loss_sum.backward()  # must not raise


def test_head_runs_only_on_supervised_rows():
    model = tiny_llama()
    batch = _batch()
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        _, n = supervised_loss(model, batch, chunk_size=4)
    finally:
        handle.remove()
    assert sum(shape[0] for shape in seen) == n
    assert all(len(shape) == 2 and shape[0] <= 4 for shape in seen)  # [rows, hidden], never [B, T, hidden]


# ------------------------------------------------------------------------------------------------------
# Shared prefix: the prefix that all rows share runs once per batch
# ------------------------------------------------------------------------------------------------------


def test_shared_prefix_length():
    batch = prefixed_batch(prefix=20)
    assert shared_prefix_length(batch["input_ids"], batch["attention_mask"]) == 20
    assert shared_prefix_length(batch["input_ids"][:1], batch["attention_mask"][:1]) == 0  # one row
    same = batch["input_ids"][:1].repeat(3, 1)
    mask = torch.ones_like(same)
    mask[2, 10:] = 0  # the shortest row keeps one token after the prefix
    assert shared_prefix_length(same, mask) == 9
    left_padded = torch.ones_like(same)
    left_padded[:, :2] = 0
    assert shared_prefix_length(same, left_padded) == 0


def _body_rows_seen(model) -> list[tuple[int, ...]]:
    seen: list[tuple[int, ...]] = []
    embeddings = model.get_input_embeddings()
    embeddings.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    return seen


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, tiny_gpt2], ids=["llama", "qwen2", "gpt2"])
def test_shared_prefix_gives_the_transformers_loss_and_gradients(build):
    model = build()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for layer in lora_layers(model).values():  # non-zero B, so the adapters change the output
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    batch = prefixed_batch()
    seen = _body_rows_seen(model)
    loss_sum, n = supervised_loss(model, batch, share_prefix=True)
    assert seen == [(1, 20), (4, 10)]  # prefix once, then only the rows' own tokens
    (loss_sum / n).backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    reference = model(**batch).loss
    reference.backward()
    torch.testing.assert_close(loss_sum / n, reference, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_shared_prefix_is_off_when_asked_short_or_checkpointing():
    model = tiny_llama()
    seen = _body_rows_seen(model)
    supervised_loss(model, prefixed_batch(), share_prefix=False)
    supervised_loss(model, prefixed_batch(prefix=MIN_SHARED_PREFIX - 1))
    assert seen == [(4, 30), (4, 30)]

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    seen.clear()
    batch = prefixed_batch()
    loss_sum, n = supervised_loss(model, batch)
    assert seen[0] == (4, 30)  # transformers drops KV caches under checkpointing: no sharing
    model.eval()
    torch.testing.assert_close(loss_sum / n, model(**batch).loss, rtol=1e-5, atol=1e-6)


# ----- replay_loss "kl": replayed rows keep the base model's distribution ---------------------------------


def _lora_llama(seed: int = 0) -> torch.nn.Module:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    model = add_lora(tiny_llama(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero; a trained adapter has moved it
        for layer in lora_layers(model).values():
            for b in layer.lora_B.values():
                b.weight.copy_(torch.randn(b.weight.shape, generator=generator) * 0.3)
    return model


def test_kl_replay_loss_is_ce_on_task_rows_plus_kl_from_the_base_on_replayed_rows():
    from tailor.lora import disable_adapters

    model = _lora_llama()
    batch = {**_batch(), "replay_index": torch.tensor([-1, 0, 1])}
    loss_sum, n = supervised_loss(model, batch, chunk_size=5, replay=KLReplay())

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    logits = model(**inputs).logits[:, :-1].float()
    with torch.no_grad(), disable_adapters(model):
        base = model(**inputs).logits[:, :-1].float()
    supervised = batch["labels"][:, 1:] != -100
    task = supervised & ~(batch["replay_index"] >= 0)[:, None]
    kept = supervised & (batch["replay_index"] >= 0)[:, None]
    ce = torch.nn.functional.cross_entropy(logits[task], batch["labels"][:, 1:][task], reduction="sum")
    p_base = base[kept].softmax(-1)
    kl = (p_base * (base[kept].log_softmax(-1) - logits[kept].log_softmax(-1))).sum()
    assert n == int(supervised.sum())
    assert kl > 0.01  # the adapter has moved the model: the term is not trivially zero
    torch.testing.assert_close(loss_sum, ce + kl, rtol=1e-4, atol=1e-4)

    # the gradient is that of the reference expression
    loss_sum.backward()
    got = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    (ce + kl).backward()
    for mine, reference in zip(got, [p.grad for p in model.parameters() if p.requires_grad], strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-3, atol=1e-5)

    # replay_loss "ce" (the default) ignores the mark: cross-entropy on every row
    plain, _ = supervised_loss(model, batch, chunk_size=5)
    torch.testing.assert_close(plain, supervised_loss(model, _batch(), chunk_size=5)[0])


def test_kl_replay_reads_the_base_hidden_states_of_known_answers_from_the_cache():
    from tailor.loss.replay import BaseHiddenCache

    model = _lora_llama()
    batch = {**_batch(), "replay_index": torch.tensor([-1, 4, 9])}
    fresh, _ = supervised_loss(model, batch, chunk_size=5, replay=KLReplay())
    cache = BaseHiddenCache()
    first, _ = supervised_loss(model, batch, chunk_size=5, replay=KLReplay(cache))
    supervised = batch["labels"][:, 1:] != -100
    assert set(cache.rows) == {4, 9}
    assert [len(cache.rows[i]) for i in (4, 9)] == supervised[1:].sum(1).tolist()
    torch.testing.assert_close(first, fresh)
    # one answer known, one new (the same text under another index): read one, compute the other
    again, _ = supervised_loss(model, {**batch, "replay_index": torch.tensor([-1, 4, 5])}, chunk_size=5,
                               replay=KLReplay(cache))
    torch.testing.assert_close(again, fresh)
    assert set(cache.rows) == {4, 5, 9}
    # it is read: a spoiled entry changes the loss
    cache.rows[4] = 10 * torch.randn(cache.rows[4].shape, generator=torch.Generator().manual_seed(0))
    spoiled, _ = supervised_loss(model, batch, chunk_size=5, replay=KLReplay(cache))
    assert abs(float(spoiled - fresh)) > 0.1
    # past its budget it keeps nothing and the loss is the same
    small = BaseHiddenCache(max_bytes=0)
    kept_nothing, _ = supervised_loss(model, batch, chunk_size=5, replay=KLReplay(small))
    torch.testing.assert_close(kept_nothing, fresh)
    assert not small.rows and small.bytes == 0


def test_kl_replay_loss_is_zero_with_zero_gradient_while_the_adapter_is_untouched():
    model = add_lora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    batch = {**_batch(), "replay_index": torch.tensor([0, 1, 2])}
    loss_sum, n = supervised_loss(model, batch, replay=KLReplay())
    assert n > 0 and abs(float(loss_sum.detach())) < 1e-5
    loss_sum.backward()
    assert all(float(p.grad.abs().max()) < 1e-6 for p in model.parameters() if p.requires_grad)
