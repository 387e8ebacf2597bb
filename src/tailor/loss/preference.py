"""Preference objectives: DPO (sigmoid and IPO losses) and ORPO, on batches of (chosen, rejected) pairs.

A batch holds the B chosen sequences in rows 0..B-1 and their rejected twins in rows B..2B-1 (labels
on the answers only, as SFT makes them), so one pass of the body scores both sides, sharing a common
prompt prefix as the supervised loss does. Per pair, with log-probabilities summed over the answer tokens
(policy: pc, pr; reference: rc, rr) and beta:

    DPO sigmoid   -log sigmoid(beta * ((pc - rc) - (pr - rr)))                   (Rafailov et al. 2023)
    DPO ipo       ((pc - rc)/|c| - (pr - rr)/|r| - 1/(2 beta))^2                    (Azar et al., as TRL)
    ORPO          -mean log p(chosen) - lambda * log sigmoid(log odds(c) - log odds(r)),
                  odds(y) = p / (1 - p) with p the per-token mean probability (Hong et al. 2024)

The reference of DPO is the model before training without a second copy of it: the same weights with the
adapter switched off (a new adapter), or with the starting adapter in its place (training on from an SFT
adapter, kept frozen beside the trained one), or for full fine-tuning a frozen copy. ORPO needs none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tailor.loss.supervised import IGNORE_INDEX, body_hidden_states
from tailor.models.parts import output_head
from tailor.names import PREFERENCE_LOSSES

REFERENCE_ADAPTER = "reference"  # the frozen copy of a starting adapter, DPO's reference beside it


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 1024,
                   share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens ([R], fp32) and how many there are
    ([R]). The head runs on the labelled positions only, in chunks, as the supervised loss does."""
    labels = batch["labels"]
    hidden = body_hidden_states(model, batch, share_prefix)  # [R, T, H]
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    rows = hidden[:, :-1][supervised]  # [N, H]
    wanted = targets[supervised]
    row_of = supervised.nonzero()[:, 0]  # [N]: the row each labelled position belongs to
    head = output_head(model)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    parts = []
    for start in range(0, rows.shape[0], chunk_size):
        logits = head(rows[start:start + chunk_size]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        parts.append(-F.cross_entropy(logits, wanted[start:start + chunk_size], reduction="none"))
    token_logps = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, row_of,
                                                                                           token_logps)
    return sums, supervised.sum(dim=1)


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
               reference_rejected: torch.Tensor, beta: float, loss: str = "sigmoid",
               chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
               ) -> torch.Tensor:
    """The per-pair DPO loss from summed log-probabilities (see the module doc); ipo needs the counts."""
    chosen_ratio, rejected_ratio = policy_chosen - reference_chosen, policy_rejected - reference_rejected
    if loss == "sigmoid":
        return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    if loss == "ipo":
        assert chosen_tokens is not None and rejected_tokens is not None
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown preference loss {loss!r}; choose one of {', '.join(PREFERENCE_LOSSES)}")


def orpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                rejected_tokens: torch.Tensor, lam: float) -> torch.Tensor:
    """The per-pair ORPO loss: the chosen answer's mean token NLL minus lambda x log sigmoid of the log
    odds ratio of the per-token mean log-probabilities (TRL's ORPO, per pair)."""
    mean_chosen = policy_chosen / chosen_tokens.clamp(min=1)
    mean_rejected = policy_rejected / rejected_tokens.clamp(min=1)
    log_odds = (mean_chosen - mean_rejected) - (torch.log1p(-torch.exp(mean_chosen))
                                                - torch.log1p(-torch.exp(mean_rejected)))
    return -mean_chosen - lam * F.logsigmoid(log_odds)


@contextlib.contextmanager
def reference_view(model: nn.Module, reference: nn.Module | str | None) -> Iterator[nn.Module]:
    """The model DPO compares against: `model` with its adapter off ("disable"), with the frozen
    REFERENCE_ADAPTER active in place of the trained one ("adapter"), or a separate frozen model."""
    from tailor.lora import active_adapters, disable_adapters, set_active_adapters

    if isinstance(reference, nn.Module):
        yield reference
    elif reference == "disable":
        with disable_adapters(model):
            yield model
    elif reference == "adapter":
        trained = active_adapters(model)
        set_active_adapters(model, REFERENCE_ADAPTER)
        try:
            yield model
        finally:
            set_active_adapters(model, trained)
    else:
        raise ValueError(f"no reference model for DPO ({reference!r})")


class PreferenceLoss(nn.Module):
    """forward(batch) -> (loss summed over the batch's pairs, the number of pairs): what the training loop
    divides and steps on, as CausalLMLoss's (loss, supervised tokens). `metrics()` returns the figures of
    the pairs seen since it was last called: reward margin, preference accuracy (the policy's reward of
    chosen above rejected: beta x log-ratio for DPO, the log odds for ORPO), chosen and rejected mean
    log-probabilities."""

    def __init__(self, model: nn.Module, objective: str, beta: float = 0.1, loss: str = "sigmoid",
                 orpo_lambda: float = 0.1, reference: nn.Module | str | None = "disable",
                 chunk_size: int = 1024, share_prefix: bool = True) -> None:
        super().__init__()
        if objective not in ("dpo", "orpo"):
            raise ValueError(f"objective {objective!r} is not a preference objective (dpo, orpo)")
        self.model, self.objective, self.beta, self.loss_kind = model, objective, beta, loss
        self.orpo_lambda, self.chunk_size, self.share_prefix = orpo_lambda, chunk_size, share_prefix
        # a separate frozen model is not a submodule (DDP/FSDP must not wrap or sync it)
        self.__dict__["reference"] = reference
        self._sums: dict[str, float] = {}

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = batch["labels"].shape[0] // 2
        if self.objective == "dpo":  # the reference first: switching adapters leaves the graph to come alone
            with torch.no_grad(), reference_view(self.model, self.reference) as reference:
                reference_logps, _ = sequence_logps(reference, batch, self.chunk_size, self.share_prefix)
            reference_chosen, reference_rejected = reference_logps[:pairs], reference_logps[pairs:]
        logps, tokens = sequence_logps(self.model, batch, self.chunk_size, self.share_prefix)
        policy_chosen, policy_rejected = logps[:pairs], logps[pairs:]
        chosen_tokens, rejected_tokens = tokens[:pairs], tokens[pairs:]
        if self.objective == "dpo":
            losses = dpo_losses(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                self.beta, self.loss_kind, chosen_tokens, rejected_tokens)
            margins = self.beta * ((policy_chosen - reference_chosen)
                                   - (policy_rejected - reference_rejected))
        else:
            losses = orpo_losses(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens,
                                 self.orpo_lambda)
            mean_chosen = policy_chosen / chosen_tokens.clamp(min=1)
            mean_rejected = policy_rejected / rejected_tokens.clamp(min=1)
            margins = (mean_chosen - mean_rejected) - (torch.log1p(-torch.exp(mean_chosen))
                                                       - torch.log1p(-torch.exp(mean_rejected)))
        self._add(pairs=pairs, reward_margin=float(margins.detach().sum()),
                  preference_accuracy=float((margins.detach() > 0).sum()),
                  chosen_logps=float(policy_chosen.detach().sum()),
                  rejected_logps=float(policy_rejected.detach().sum()))
        return losses.sum(), torch.tensor(pairs, dtype=torch.int64)

    def _add(self, **values: float) -> None:
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + value

    def metrics(self) -> dict[str, float]:
        """Means over the pairs since the last call (and reset)."""
        sums, self._sums = self._sums, {}
        pairs = sums.pop("pairs", 0)
        return {key: value / pairs for key, value in sums.items()} if pairs else {}


def count_pairs(batch: dict[str, Any]) -> int:
    return int(batch["labels"].shape[0]) // 2





@torch.no_grad()
def preference_validation(module: PreferenceLoss, pairs: list[Any], batch_size: int, pad_id: int,
                          precision: str = "auto", max_batches: int | None = None,
                          ) -> tuple[float | None, dict[str, float]]:
    """The mean preference loss over held-out `pairs` and their metrics (PreferenceLoss.metrics), with
    the model in eval mode (dropout off)."""
    from tailor.loss.validation import collate_batch, compute_context

    if not pairs:
        return None, {}
    model = module.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    module.metrics()  # the training steps' figures are not the validation's
    total, count = 0.0, 0
    try:
        for b, start in enumerate(range(0, len(pairs), batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            batch = collate_batch(pairs[start:start + batch_size], pad_id, device)
            with compute_context(device, precision):
                loss_sum, n = module(batch)
            total, count = total + float(loss_sum), count + int(n)
    finally:
        model.train(was_training)
    return (total / count if count else None), module.metrics()


__all__ = ["PreferenceLoss", "REFERENCE_ADAPTER", "count_pairs",
           "dpo_losses", "orpo_losses", "preference_validation", "reference_view", "sequence_logps"]
