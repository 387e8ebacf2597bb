"""Logits processors with vLLM's meanings, applied to a row's logits before its token is chosen (and
after its log-probabilities are taken: those are the model's own distribution).

- `min_tokens`: until the request has generated that many tokens, its stop tokens (eos and the chat end
  tokens unless `ignore_eos`, and its `stop_token_ids`) cannot be chosen.
- `repetition_penalty` p (the CTRL paper's, as vLLM and transformers apply it): the logit of every token
  present in the prompt or in the answer so far is divided by p when positive, multiplied by p when not
  (p > 1 discourages repeating; 1 is off).

Only the rows that ask for something are touched; the others keep their logits as they are.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch


def processed_rows(requests: Sequence) -> list[int]:
    """The rows whose logits a processor changes at this step."""
    return [i for i, r in enumerate(requests)
            if r.params.repetition_penalty != 1 or r.generated < r.params.min_tokens]


def process_logits(logits: torch.Tensor, requests: Sequence, stop_ids: Collection[int],
                   rows: Sequence[int]) -> torch.Tensor:
    """The logits (B, V) with `rows` processed, as a new fp32 tensor (`rows` from `processed_rows`)."""
    logits = logits.float().clone()  # (B, V)
    for i in rows:
        request = requests[i]
        params = request.params
        if params.repetition_penalty != 1:
            seen = torch.tensor(request.prompt_ids + request.output_ids, device=logits.device).unique()
            values = logits[i, seen]
            logits[i, seen] = torch.where(values > 0, values / params.repetition_penalty,
                                          values * params.repetition_penalty)
        if request.generated < params.min_tokens:
            banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(stop_ids))
            if banned:
                logits[i, sorted(banned)] = float("-inf")
    return logits


__all__ = ["process_logits", "processed_rows"]
