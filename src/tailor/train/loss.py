"""Supervised next-token loss that runs the output head only where a label carries loss.

Why: a causal LM's head maps every position to the whole vocabulary. For the default model that is
hidden 576 -> vocab 49152, so `model(**batch).loss` spends most of a training step building and
differentiating a [B, T, 49152] logits tensor, although only the assistant tokens (often a fifth of
the batch) carry loss and pad tokens carry none. Here the transformer body runs once, the hidden states
of supervised positions are gathered, and the head + cross-entropy run on those rows only, in chunks
with fp32 logits per chunk, so the full logits tensor is never built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def transformer_body(model: nn.Module) -> nn.Module:
    """The part of an HF causal LM that returns hidden states (everything but the output head)."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            body = get_decoder()
        except (AttributeError, NotImplementedError):
            body = None
        if body is not None and body is not model:
            return body
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if body is None or body is model:
        raise TypeError(
            f"{type(model).__name__} exposes no transformer body (get_decoder() or "
            f"`{prefix or 'base_model_prefix'}`); supervised_loss needs an HF causal LM."
        )
    return body


def output_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output head (get_output_embeddings() is None).")
    return head


def supervised_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 1024
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over supervised tokens, and how many there are.

    With hidden states h = body(input_ids) of shape [B, T, H], position t predicts token t+1, so
    loss = sum_{(b, t): labels[b, t+1] != -100} CE(head(h[b, t]), labels[b, t+1]).
    The head runs on the N supervised rows only ([N, H] -> [N, V]), `chunk_size` rows at a time, with
    the logits upcast to fp32 before the softmax (bf16 log-softmax over 49k classes loses digits).

    Returns (loss_sum, n): divide by n (or by the count over an accumulation window) for the mean.
    When n == 0 the loss is a zero that still depends on the graph, so backward() works.
    """
    labels = batch["labels"]
    body_inputs = {"input_ids": batch["input_ids"]}
    if "attention_mask" in batch:
        body_inputs["attention_mask"] = batch["attention_mask"]
    hidden = transformer_body(model)(**body_inputs, use_cache=False)[0]  # [B, T, H]

    targets = labels[:, 1:]  # [B, T-1]: the token each position predicts
    supervised = targets != IGNORE_INDEX  # [B, T-1]
    rows = hidden[:, :-1][supervised]  # [N, H]: only positions whose next token carries loss
    wanted = targets[supervised]  # [N]
    n = int(wanted.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0

    head = output_head(model)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        logits = head(rows[start : start + chunk_size]).float()  # [chunk, V] in fp32
        if softcap:  # Gemma-style models squash logits before the softmax
            logits = torch.tanh(logits / softcap) * softcap
        total = total + F.cross_entropy(logits, wanted[start : start + chunk_size], reduction="sum")
    return total, n


def count_supervised(labels: torch.Tensor) -> int:
    """Number of tokens that carry loss in a batch (labels already unshifted, as collate makes them)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
