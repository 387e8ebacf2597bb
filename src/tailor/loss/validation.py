"""Validation loss: the training objective on held-out examples, as one number."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from tailor.hardware import precision_for
from tailor.loss.module import CausalLMLoss
from tailor.loss.supervised import supervised_loss


class Tokenized(Protocol):
    input_ids: list[int]
    labels: list[int]


def compute_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when `precision` is (or auto resolves to) bf16 on `device`: matmuls run in bf16 (native
    on AVX512-BF16/AMX CPUs and tensor cores) while the fp32 trainable weights stay the master copy the
    optimizer updates. Nothing for fp32."""
    if precision_for(precision, device.type) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def collate_batch(examples: Sequence[Tokenized], pad_id: int,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded tensors (tailor.data.collate), moved to `device`. Preference pairs (with .chosen and
    .rejected) become 2B rows: the B chosen, then the B rejected (tailor.loss.preference)."""
    from tailor.data import collate

    rows = list(examples)
    if rows and hasattr(rows[0], "chosen"):
        rows = [p.chosen for p in rows] + [p.rejected for p in rows]  # type: ignore[attr-defined]
    batch = collate(rows, pad_id)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def validation_loss(model: nn.Module, examples: Sequence[Tokenized], batch_size: int, pad_id: int,
                    precision: str = "auto", max_batches: int | None = None,
                    chunk_size: int = 1024) -> float | None:
    """Mean token cross-entropy over the supervised tokens of `examples` (None when there are none).
    `model` is a causal LM, or the training module (CausalLMLoss) around one, as FSDP wraps it."""
    if not examples:
        return None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding
    total, count = 0.0, 0
    try:
        for b, start in enumerate(range(0, len(order), batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            batch = collate_batch([examples[i] for i in order[start:start + batch_size]], pad_id, device)
            with compute_context(device, precision):
                if isinstance(model, CausalLMLoss):
                    loss_sum, n = model(batch)
                else:
                    loss_sum, n = supervised_loss(model, batch, chunk_size)
            total += float(loss_sum)
            count += int(n)
    finally:
        model.train(was_training)
    return total / count if count else None
