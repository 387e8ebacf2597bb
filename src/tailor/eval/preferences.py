"""Preference accuracy: how often a model scores the preferred answer of a held-out pair above the other
one (the summed log-probability of each answer given the prompt, as DPO's data is scored), base against
tuned. A property of the model alone, so an SFT adapter, a DPO one and the base are measured alike."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from tailor.data.preferences import PreferencePair, tokenize_pairs
from tailor.loss.preference import sequence_logps
from tailor.loss.validation import collate_batch


@torch.no_grad()
def preference_accuracy(model: nn.Module, tokenizer: Any, pairs: list[PreferencePair], batch_size: int = 16,
                        max_seq_len: int = 1024) -> dict[str, Any]:
    """{"n", "accuracy": share of pairs with log p(chosen) > log p(rejected), "mean_margin": the mean of
    log p(chosen) - log p(rejected)}."""
    tokenized, _ = tokenize_pairs(pairs, tokenizer, max_seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    margins: list[float] = []
    try:
        for start in range(0, len(tokenized), batch_size):
            chunk = tokenized[start:start + batch_size]
            logps, _ = sequence_logps(model, collate_batch(chunk, pad, device))
            margins += (logps[:len(chunk)] - logps[len(chunk):]).tolist()
    finally:
        model.train(was_training)
    n = len(margins)
    return {"n": n, "accuracy": sum(m > 0 for m in margins) / n, "mean_margin": sum(margins) / n}


def compare_preferences(model: nn.Module, tokenizer: Any, pairs: list[PreferencePair],
                        base_model: nn.Module | None = None, batch_size: int = 16,
                        max_seq_len: int = 1024) -> dict[str, Any]:
    """Preference accuracy of the base (`base_model`, else `model` with its adapters off) and the tuned."""
    from tailor.lora import disable_adapters

    with disable_adapters(model) if base_model is None else contextlib.nullcontext():
        base = preference_accuracy(base_model or model, tokenizer, pairs, batch_size, max_seq_len)
    tuned = preference_accuracy(model, tokenizer, pairs, batch_size, max_seq_len)
    return {"n": base["n"], "base": base, "tuned": tuned}


__all__ = ["compare_preferences", "preference_accuracy"]
