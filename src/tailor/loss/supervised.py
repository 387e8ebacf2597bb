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


def supervised_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 1024, share_prefix: bool = True,
    replay_loss: str = "ce", base_cache: BaseHiddenCache | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over supervised tokens, and how many there are.

    With hidden states h = body(input_ids) of shape [B, T, H], position t predicts token t+1, so
    loss = sum_{(b, t): labels[b, t+1] != -100} CE(head(h[b, t]), labels[b, t+1]).
    The head runs on the N supervised rows only ([N, H] -> [N, V]), `chunk_size` rows at a time, with
    the logits upcast to fp32 before the softmax (bf16 log-softmax over 49k classes loses digits).

    With replay_loss "kl", the rows the batch marks in `replay_index` (>= 0: the base model's own answers)
    take instead KL(base || model) at each supervised position: the divergence of the model's next-token
    distribution from the one the base model (the same model with its adapters switched off) gives there.
    It is zero until the adapter moves the model on those answers, and then pulls back toward the base's
    whole distribution rather than toward the one answer the base happened to sample. The base's hidden
    states of an answer do not change during training: `base_cache` keeps them from the answer's first
    visit, so later visits skip the base model's body.

    Returns (loss_sum, n): divide by n (or by the count over an accumulation window) for the mean.
    When n == 0 the loss is a zero that still depends on the graph, so backward() works.
    """
    labels = batch["labels"]
    hidden = body_hidden_states(model, batch, share_prefix)  # [B, T, H]

    targets = labels[:, 1:]  # [B, T-1]: the token each position predicts
    supervised = targets != IGNORE_INDEX  # [B, T-1]
    index = batch.get("replay_index") if replay_loss == "kl" else None
    replayed = index >= 0 if index is not None else None
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
        base = _base_hidden_states(model, batch, replayed, supervised[replayed], share_prefix, base_cache)
        total = total + _divergence_from_base(model, hidden[:, :-1][kept], base, logits_of, chunk_size)
        n += int(kept.sum())
    return total, n


class BaseHiddenCache:
    """The base model's hidden states at the supervised positions of replayed answers, by answer index,
    up to `max_bytes` (answers past the budget are recomputed at each visit)."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes, self.bytes, self.rows = max_bytes, 0, {}

    def get(self, index: int) -> torch.Tensor | None:
        return self.rows.get(index)

    def put(self, index: int, rows: torch.Tensor) -> None:
        size = rows.numel() * rows.element_size()
        if self.bytes + size <= self.max_bytes:
            self.rows[index] = rows
            self.bytes += size


def _base_hidden_states(model: nn.Module, batch: dict[str, torch.Tensor], replayed: torch.Tensor,
                        positions: torch.Tensor, share_prefix: bool,
                        cache: BaseHiddenCache | None) -> torch.Tensor:
    """The base model's (adapters off, no gradients) hidden states at the supervised positions of the
    replayed rows: [N, H], row by row, `positions` being their [R, T-1] mask within those rows. Rows whose
    answer is in `cache` are read from it; the others run through the body together, and are kept."""
    from tailor.lora import disable_adapters

    indices = batch["replay_index"][replayed].tolist()
    known = [cache.get(i) if cache is not None else None for i in indices]
    missing = [r for r, rows in enumerate(known) if rows is None]
    if missing:
        pick = replayed.nonzero().squeeze(1)[missing]
        sub = {key: batch[key][pick] for key in ("input_ids", "attention_mask") if key in batch}
        with torch.no_grad(), disable_adapters(model):
            hidden = body_hidden_states(model, sub, share_prefix)[:, :-1]
        for j, r in enumerate(missing):
            known[r] = hidden[j][positions[r]]
            if cache is not None:
                cache.put(indices[r], known[r])
    return torch.cat(known)


def _divergence_from_base(model: nn.Module, rows: torch.Tensor, base_rows: torch.Tensor,
                          logits_of: Callable[[torch.Tensor], torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Sum over positions of KL(base || model): `rows` are the model's hidden states there, `base_rows` the
    base model's ([N, H] each); the head runs with the adapters off for the base (it may carry one)."""
    from tailor.lora import disable_adapters

    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, len(rows), chunk_size):
        with torch.no_grad(), disable_adapters(model):
            base = F.log_softmax(logits_of(base_rows[start : start + chunk_size]), dim=-1)
        mine = F.log_softmax(logits_of(rows[start : start + chunk_size]), dim=-1)
        total = total + F.kl_div(mine, base, log_target=True, reduction="sum")
    return total


def count_supervised(labels: torch.Tensor) -> int:
    """Number of tokens that carry loss in a batch (labels already unshifted, as collate makes them)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
