"""supervised_loss == the transformers model's own loss, computed only on supervised rows."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_gpt2, tiny_llama, tiny_qwen2

from tailor.train import supervised_loss
from tailor.train.loss import count_supervised


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
