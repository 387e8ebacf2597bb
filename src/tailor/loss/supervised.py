"""Supervised next-token loss that runs the output head only where a label carries loss.

Why: a causal LM's head maps every position to the whole vocabulary. For the default model that is
hidden 576 -> vocab 49152, so `model(**batch).loss` spends most of a training step building and
differentiating a [B, T, 49152] logits tensor, although only the assistant tokens (often a fifth of
the batch) carry loss and pad tokens carry none. Here the transformer body runs once, the hidden states
of supervised positions are gathered, and the head + cross-entropy run on those rows only, in chunks
with fp32 logits per chunk, so the full logits tensor is never built.

Shared prefix: when every row of a batch starts with the same tokens (a fixed system prompt, a task
instruction), the body runs that prefix once for the whole batch instead of once per row; see
`body_hidden_states`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tailor.data.tokenize import IGNORE_INDEX  # noqa: E402  (one definition, where labels are made)
from tailor.models.parts import MIN_SHARED_PREFIX, output_head, transformer_body


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
    """Length of the token prefix that every row of a right-padded batch shares.

    Capped so that each row keeps at least one real token after the prefix (the suffix pass then has
    something to compute for every row) and so that the prefix holds no padding.
    """
    if input_ids.shape[0] < 2:
        return 0
    differs = (input_ids != input_ids[:1]).any(dim=0).nonzero()  # columns where some row differs
    length = int(differs[0]) if len(differs) else input_ids.shape[1]
    if attention_mask is not None:
        real = attention_mask.sum(dim=1)
        length = min(length, int(real.min()) - 1)
        if length > 0 and not bool(attention_mask[:, :length].all()):  # left padding: not a real prefix
            return 0
    else:
        length = min(length, input_ids.shape[1] - 1)
    return max(length, 0)


def _expand_cache_rows(cache: object, rows: int) -> bool:
    """Broadcast a batch-1 KV cache to `rows` rows in place (views, no copy); False if not possible."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        return False
    for layer in layers:
        layer.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
        layer.values = layer.values.expand(rows, *layer.values.shape[1:])
    return True


def activation_checkpointing_on(model: nn.Module) -> bool:
    """Whether transformers' activation (a.k.a. gradient) checkpointing is enabled on `model`."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def body_hidden_states(
    model: nn.Module, batch: dict[str, torch.Tensor], share_prefix: bool = True
) -> torch.Tensor:
    """Hidden states [B, T, H] of the transformer body for a right-padded batch.

    With `share_prefix`, when all B rows start with the same P >= MIN_SHARED_PREFIX tokens, the prefix
    runs once as a batch of one, its keys/values are broadcast to the B rows as a KV cache, and only the
    B x (T - P) suffix runs batched: (B - 1) x P fewer token positions through every layer. The result is
    the same function of the weights (the prefix's hidden states and K/V do not depend on the row), and
    autograd sums the rows' gradients through the broadcast. Not used with activation checkpointing,
    which disables KV caches in transformers' decoder layers.
    """
    body = transformer_body(model)
    input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
    prefix = 0
    if share_prefix and not activation_checkpointing_on(model):
        prefix = shared_prefix_length(input_ids, attention_mask)
    if prefix >= MIN_SHARED_PREFIX:
        # transformers >= 5.24 names the KV cache `cache` (argument and output field); the old name
        # `past_key_values` still works but warns (a FutureWarning as an argument, a log line as an output
        # field) and goes in 5.40.
        head = body(input_ids=input_ids[:1, :prefix], use_cache=True)
        rows = input_ids.shape[0]
        if _expand_cache_rows(head.cache, rows):
            tail = body(input_ids=input_ids[:, prefix:], attention_mask=attention_mask,
                        cache=head.cache, use_cache=True)
            return torch.cat([head[0].expand(rows, -1, -1), tail[0]], dim=1)  # [B, T, H]
    inputs = {"input_ids": input_ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    return body(**inputs, use_cache=False)[0]


class ReplayLoss(Protocol):
    """How `supervised_loss` learns the rows a batch marks as replayed: the seam it calls, implemented by
    tailor.loss.replay's CrossEntropyReplay and KLReplay."""

    name: str

    def rows_apart(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """[B] bool: the rows learned by `loss` instead of cross-entropy; None when there are none."""
        ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], rows: torch.Tensor,
             replayed: torch.Tensor, positions: torch.Tensor, share_prefix: bool,
             logits_of: Callable[[torch.Tensor], torch.Tensor], chunk_size: int) -> torch.Tensor:
        """The summed loss of the rows apart: `rows` are the model's hidden states at their supervised
        positions ([N, H]), `positions` the [R, T-1] mask of those within the rows apart."""
        ...


def supervised_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 1024, share_prefix: bool = True,
    replay: ReplayLoss | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over supervised tokens, and how many there are.

    With hidden states h = body(input_ids) of shape [B, T, H], position t predicts token t+1, so
    loss = sum_{(b, t): labels[b, t+1] != -100} CE(head(h[b, t]), labels[b, t+1]).
    The head runs on the N supervised rows only ([N, H] -> [N, V]), `chunk_size` rows at a time, with
    the logits upcast to fp32 before the softmax (bf16 log-softmax over 49k classes loses digits).

    `replay` says how the rows the batch marks in `replay_index` (the base model's own answers) are
    learned (tailor.loss.replay): None or CrossEntropyReplay, as every other row; KLReplay, by the
    divergence from the base model's whole next-token distribution instead.

    Returns (loss_sum, n): divide by n (or by the count over an accumulation window) for the mean.
    When n == 0 the loss is a zero that still depends on the graph, so backward() works.
    """
    labels = batch["labels"]
    hidden = body_hidden_states(model, batch, share_prefix)  # [B, T, H]

    targets = labels[:, 1:]  # [B, T-1]: the token each position predicts
    supervised = targets != IGNORE_INDEX  # [B, T-1]
    replayed = replay.rows_apart(batch) if replay is not None else None
    if replayed is not None and bool(replayed.any()):
        learned = supervised & ~replayed[:, None]
        kept = supervised & replayed[:, None]
    else:
        learned, kept = supervised, None
    rows = hidden[:, :-1][learned]  # [N, H]: only positions whose next token carries loss
    wanted = targets[learned]  # [N]
    n = int(wanted.numel())
    if n == 0 and (kept is None or not bool(kept.any())):
        return hidden.sum() * 0.0, 0
    total = hidden.new_zeros((), dtype=torch.float32)
    head = output_head(model)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)

    def logits_of(chunk: torch.Tensor) -> torch.Tensor:
        logits = head(chunk).float()  # [chunk, V] in fp32
        if softcap:  # Gemma-style models squash logits before the softmax
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    for start in range(0, n, chunk_size):
        total = total + F.cross_entropy(logits_of(rows[start : start + chunk_size]),
                                        wanted[start : start + chunk_size], reduction="sum")
    if kept is not None:
        assert replay is not None and replayed is not None
        total = total + replay.loss(model, batch, hidden[:, :-1][kept], replayed, supervised[replayed],
                                    share_prefix, logits_of, chunk_size)
        n += int(kept.sum())
    return total, n


def count_supervised(labels: torch.Tensor) -> int:
    """Number of tokens that carry loss in a batch (labels already unshifted, as collate makes them)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
