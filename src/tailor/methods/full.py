"""Full fine-tuning: every weight trainable, delivered as a complete transformers model directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tailor.files import atomic_output
from tailor.methods.base import TrainingMethod, set_trainable

if TYPE_CHECKING:
    from tailor.config import TrainConfig


class FullMethod(TrainingMethod):
    """Precision (why): weights and AdamW moments stay fp32, because bf16 weights would swallow the small
    updates; autocast computes in bf16. Memory is therefore 16 bytes per parameter."""

    float_base = False  # every weight trains: no frozen base to store otherwise

    def train_dtype(self, precision: str, base_dtype: str = "auto") -> torch.dtype:
        return torch.float32  # master weights (see the class docstring)

    def adapt(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        model.to(torch.float32)
        set_trainable(model, True)
        return model

    def save(self, model: nn.Module, directory: Path, tokenizer: Any = None) -> Path:
        with atomic_output(directory, directory=True) as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return Path(directory)

    def attach(self, base: nn.Module, directory: Path) -> nn.Module:
        from tailor.models import load_model

        tuned, _ = load_model(str(directory), dtype=next(base.parameters()).dtype,
                              device=str(next(base.parameters()).device))
        return tuned

    def merged(self, model: nn.Module) -> nn.Module:
        return model  # nothing to fold in: the weights are the result
