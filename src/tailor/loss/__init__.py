"""The training objective, below both train/ and eval/: the supervised next-token loss, the module that
owns a model and returns that loss (what DDP and FSDP wrap), and the validation loss."""

from tailor.loss.module import CausalLMLoss
from tailor.loss.replay import CrossEntropyReplay, KLReplay, replay_loss_for
from tailor.loss.supervised import (
    IGNORE_INDEX,
    MIN_SHARED_PREFIX,
    body_hidden_states,
    count_supervised,
    shared_prefix_length,
    supervised_loss,
)
from tailor.loss.validation import Tokenized, collate_batch, compute_context, validation_loss

__all__ = ["IGNORE_INDEX", "MIN_SHARED_PREFIX", "CausalLMLoss", "CrossEntropyReplay", "KLReplay", "Tokenized",
           "body_hidden_states", "collate_batch", "compute_context", "count_supervised", "replay_loss_for",
           "shared_prefix_length", "supervised_loss", "validation_loss"]
