"""The model runner: one forward of the model over a planned batch (`tailor.serve.batch.Forward`), and
each row's next token from its logits.

The forward is transformers' own, with `RowKVCache` as its cache and each row's adapter slot set for the
forward's duration. For models whose logits are just `head(hidden)` in a low precision, the body and head
run apart, so that greedy choices can be re-scored in fp32 from the hidden state (`refine_greedy`).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from tailor.models.parts import output_head, transformer_body
from tailor.serve.adapters import EngineAdapters
from tailor.serve.batch import Forward
from tailor.serve.kv import RowKVCache
from tailor.serve.processors import process_logits, processed_rows
from tailor.serve.request import Request
from tailor.serve.sampling import choose_tokens

# Model types whose causal-LM forward is exactly `logits = lm_head(hidden)` (no softcap, no scaling).
PLAIN_HEAD_MODELS = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gpt2", "phi3", "smollm3", "olmo",
                     "olmo2", "starcoder2"}


class ModelRunner:
    """Runs planned forwards of one model and chooses tokens (engine thread only).

    Args:
        model: a transformers causal LM with sdpa or eager attention.
        cache: the batch's KV cache.
        adapters: per-row adapters (their slots are set for each forward), or None.
        attention: the model's attention implementation ("sdpa" or "eager").
    """

    def __init__(self, model: nn.Module, cache: RowKVCache, adapters: EngineAdapters | None,
                 attention: str) -> None:
        self.model, self.cache, self.adapters, self.attention = model, cache, adapters, attention
        self.split = body_and_head(model)  # (body, head) when the logits are just head(hidden)
        self.hidden: torch.Tensor | None = None  # (B, H) the last forward's last hidden states (split only)
        self.dtype = next(model.parameters()).dtype

    def forward(self, step: Forward, keep: int | None = None) -> torch.Tensor:
        """One forward of the model over the planned rows/columns; the last position's logits (B, V), or
        with `keep`, the last `keep` positions' (B, keep, V) (a prompt's log-probabilities)."""
        self.cache.plan(step.rows, step.write_start, step.view_start)
        mask = step.mask
        if mask is not None and self.attention == "eager":  # eager attention adds the mask
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(self.dtype).min)
        adapters = self.adapters
        if adapters is not None:
            adapters.use_rows(step.slots)
        try:
            if self.split is None:
                out = self.model(input_ids=step.input_ids, position_ids=step.positions, attention_mask=mask,
                                 cache=self.cache, use_cache=True, logits_to_keep=keep or 1)
                self.hidden = None
                return out.logits if keep else out.logits[:, -1, :]  # (B, keep, V) or (B, V)
            body, head = self.split
            out = body(input_ids=step.input_ids, position_ids=step.positions, attention_mask=mask,
                       cache=self.cache, use_cache=True)
            self.hidden = out.last_hidden_state[:, -1, :]  # (B, H): the greedy choice is refined from it
            if keep:
                return head(out.last_hidden_state[:, -keep:, :])  # (B, keep, V)
            return head(self.hidden)  # (B, V)
        finally:
            if adapters is not None:
                adapters.use_rows(None)

    def choose(self, requests: list[Request], logits: torch.Tensor,
               stop_ids: Collection[int] = ()) -> list[int]:
        """Each request's next token from its row of the last forward's logits (its own processors and
        sampling; `stop_ids`: the tokens that end an answer, which min_tokens holds back)."""
        processed = processed_rows(requests)
        chosen_from = process_logits(logits, requests, stop_ids, processed) if processed else logits
        tokens = choose_tokens(chosen_from, [r.params for r in requests], [r.generator for r in requests])
        if self.hidden is not None and logits.dtype != torch.float32:
            greedy = self.refine_greedy(logits).tolist()
            changed = set(processed)  # a processed row's argmax is its processed logits' own
            tokens = [g if r.params.greedy and i not in changed else t
                      for i, (r, t, g) in enumerate(zip(requests, tokens, greedy, strict=True))]
        return tokens

    def refine_greedy(self, logits: torch.Tensor, k: int = 4) -> torch.Tensor:
        """Each row's argmax, with the top k of the model-dtype logits scored again with fp32 accumulation
        (from the last forward's hidden states; split models only).

        bf16 logits are rounded to 1/8 near 25: two tokens a few hundredths apart often round to the same
        value, and the argmax would then take the lower token id. Re-scoring k candidates costs k dot
        products per row (the full head in fp32 would cost 3.5x the bf16 head).
        """
        _, head = self.split
        top = logits.topk(k, dim=-1).indices  # (B, k)
        rows = head.weight.index_select(0, top.reshape(-1)).view(*top.shape, -1).float()  # (B, k, H)
        scores = torch.bmm(rows, self.hidden.float()[:, :, None]).squeeze(-1)  # (B, k, H) @ (B, H, 1)
        if head.bias is not None:
            scores = scores + head.bias[top].float()
        scores = scores.masked_fill(logits.gather(1, top).isneginf(), float("-inf"))  # masked: stays out
        return top.gather(1, scores.argmax(dim=-1, keepdim=True)).squeeze(1)  # (B,)


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(transformer body, plain nn.Linear head) when the engine may run them apart (to refine greedy
    choices in fp32); None for fp32 models (nothing to refine) and anything else."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    if next(model.parameters()).dtype == torch.float32:
        return None
    try:
        body, head = transformer_body(model), output_head(model)
    except TypeError:
        return None
    if type(head) is not nn.Linear:  # a LoRA-wrapped head: keep forward
        return None
    return body, head


__all__ = ["PLAIN_HEAD_MODELS", "ModelRunner", "body_and_head"]

