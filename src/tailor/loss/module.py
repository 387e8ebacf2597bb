"""The training module: an nn.Module that owns the model and whose forward returns the supervised loss.

Why a module and not a function: DistributedDataParallel and FSDP synchronise gradients through hooks on
the forward of the module they wrap. `supervised_loss` calls the transformer body and the output head
directly (that is where its speed comes from), so a wrapped *model* would never see that call. Wrapping
this module instead keeps the fast path and puts every call inside the wrapped forward.
"""

from __future__ import annotations

import torch
from torch import nn

from tailor.loss.supervised import ReplayLoss, supervised_loss


class CausalLMLoss(nn.Module):
    """forward(batch) -> (loss_sum, n_supervised): the summed next-token cross-entropy over supervised
    tokens of a right-padded batch {input_ids, attention_mask, labels} ([B, T] each), and their count
    as a 0-dim int64 tensor (a tensor so that DDP can hand it back unchanged). `replay` is how replayed
    rows are learned (tailor.loss.replay: cross-entropy as the others when None)."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024, share_prefix: bool = True,
                 replay: ReplayLoss | None = None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.share_prefix = share_prefix
        self.replay = replay

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum, n = supervised_loss(self.model, batch, self.chunk_size, self.share_prefix, self.replay)
        return loss_sum, torch.tensor(n, dtype=torch.int64)
