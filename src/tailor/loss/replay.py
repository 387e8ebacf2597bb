"""How a replayed answer (the base model's own answer to a general prompt, tailor.train.replay) is learned:
two loss objects, chosen once from the config's replay_loss by `replay_loss_for`.

CrossEntropyReplay ("ce"): as every other example, cross-entropy on the answer's tokens.
KLReplay ("kl"): KL(base || model) at each supervised position of the replayed rows: the divergence of the
model's next-token distribution from the one the base model (the same model with its adapters switched
off) gives there. It is zero until the adapter moves the model on those answers, and then pulls back
toward the base's whole distribution rather than toward the one answer the base happened to sample. The
base's hidden states of an answer do not change during training: the object's BaseHiddenCache keeps them
from the answer's first visit, so later visits skip the base model's body.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tailor.loss.supervised import ReplayLoss, body_hidden_states


class CrossEntropyReplay:
    """replay_loss "ce": no row is set apart; the supervised loss is cross-entropy everywhere."""

    name = "ce"

    def rows_apart(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The rows learned by this object's own loss instead of cross-entropy: none."""
        return None

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], rows: torch.Tensor,
             replayed: torch.Tensor, positions: torch.Tensor, share_prefix: bool,
             logits_of: Callable[[torch.Tensor], torch.Tensor], chunk_size: int) -> torch.Tensor:
        """The loss of the rows apart: there are none, so zero (supervised_loss does not ask)."""
        return rows.new_zeros((), dtype=torch.float32)


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


class KLReplay:
    """replay_loss "kl": replayed rows take the divergence from the base model (module docstring)."""

    name = "kl"

    def __init__(self, cache: BaseHiddenCache | None = None) -> None:
        self.cache = cache

    def rows_apart(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """[B] bool: the rows the batch marks as replayed (replay_index >= 0); None when it marks none."""
        index = batch.get("replay_index")
        return index >= 0 if index is not None else None

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], rows: torch.Tensor,
             replayed: torch.Tensor, positions: torch.Tensor, share_prefix: bool,
             logits_of: Callable[[torch.Tensor], torch.Tensor], chunk_size: int) -> torch.Tensor:
        """Sum of KL(base || model) over the supervised positions of the replayed rows: `rows` are the
        model's hidden states there ([N, H]), `positions` their [R, T-1] mask within the replayed rows."""
        base = _base_hidden_states(model, batch, replayed, positions, share_prefix, self.cache)
        return _divergence_from_base(model, rows, base, logits_of, chunk_size)


def replay_loss_for(name: str) -> ReplayLoss:
    """The loss object of the config's replay_loss ("ce" or "kl"; the config has checked the name); KL
    keeps its own cache of the base model's hidden states."""
    return KLReplay(BaseHiddenCache()) if name == KLReplay.name else CrossEntropyReplay()


__all__ = ["BaseHiddenCache", "CrossEntropyReplay", "KLReplay", "replay_loss_for"]
