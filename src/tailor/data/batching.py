"""Split, order and pad examples: deterministic from a seed, grouped by length to cut padding."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from tailor.data.example import replay_index
from tailor.data.tokenize import IGNORE_INDEX, TokenizedExample

__all__ = ["batch_indices", "collate", "split_examples"]

T = TypeVar("T")
MEGA_CHUNK_BATCHES = 64  # length grouping sorts within chunks of this many batches, so order stays random


def split_examples(examples: list[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split into (train, val): a seeded random val_fraction of the examples goes to val.

    Both parts keep the input order. At least one example goes to val when val_fraction > 0, and at least
    one stays in train.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in [0, 1).")
    n = len(examples)
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n_val and n - n_val < 1:
        raise ValueError(f"cannot split {n} example(s) into train and validation; give more data or "
                         "val_fraction=0 with a separate validation file.")
    chosen = set(np.random.default_rng([seed, 0x5EED]).permutation(n)[:n_val].tolist())
    train = [example for i, example in enumerate(examples) if i not in chosen]
    val = [example for i, example in enumerate(examples) if i in chosen]
    return train, val


def batch_indices(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """Indices of each batch for one epoch; the same (seed, epoch) always gives the same batches.

    With group_by_length the shuffled indices are cut into mega-chunks of 64 * batch_size, each chunk is
    sorted by length (longest first) and cut into batches, and the batch order is shuffled: batches hold
    similar lengths (little padding) while each epoch still sees a different order.
    Only the last batch of the epoch may be smaller than batch_size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1.")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    if not group_by_length:
        return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    chunk = MEGA_CHUNK_BATCHES * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        # sorted() is stable: equal lengths keep their shuffled order
        part = sorted(order[start: start + chunk], key=lambda i: -lengths[i])
        batches += [part[i: i + batch_size] for i in range(0, len(part), batch_size)]
    # the one short batch (end of the last chunk) stays last, so every other step sees a full batch
    full, short = ([b for b in batches if len(b) == batch_size], [b for b in batches if len(b) < batch_size])
    return [full[i] for i in rng.permutation(len(full)).tolist()] + short


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Returns input_ids, attention_mask, labels: (batch, max_len) int64 tensors.

    Padding positions get pad_id, attention 0 and label IGNORE_INDEX (-100). When some rows replay the
    base model's own answers, `replay_index` is added: a (batch,) int64 tensor, each row's replayed answer
    (tailor.data.replay_index), -1 for the other rows.
    """
    if not examples:
        raise ValueError("collate needs at least one example.")
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    replayed = [replay_index(getattr(example, "source", "")) for example in examples]
    if max(replayed) >= 0:
        batch["replay_index"] = torch.tensor(replayed)
    return batch
