"""The interface every training method implements; the parts all methods share live here too."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tailor.files import atomic_output

if TYPE_CHECKING:
    from tailor.config import TrainConfig
    from tailor.method_specs import MethodSpec


class TrainingMethod:
    """One way of adapting a model: what it makes trainable, in which dtype, and what it delivers.

    Subclasses implement `adapt` (dtype, adapters or quantization, trainable flags), `save` (the
    deliverable), `attach` (a saved deliverable onto a freshly loaded base) and `merged` (a plain
    transformers model with the deliverable folded in). Everything else is shared.
    """

    def __init__(self, spec: MethodSpec):
        self.spec = spec
        self.name = spec.name

    # --- the parts each method defines ----------------------------------------------------------------
    def adapt(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        raise NotImplementedError

    def save(self, model: nn.Module, directory: Path, tokenizer: Any) -> Path:
        raise NotImplementedError

    def attach(self, base: nn.Module, directory: Path) -> nn.Module:
        """The tuned model for evaluation or use: `base` itself with an adapter attached (then the base
        view is `tailor.lora.disable_adapters`), or a separate model loaded from `directory`."""
        raise NotImplementedError

    def merged(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------------------
    base_quantization: str | None = None  # bitsandbytes kind the frozen block linears are loaded in (QLoRA)
    float_base = True  # a frozen base of float weights, whose storage dtype `base_dtype` picks (LoRA)

    def train_dtype(self, precision: str, base_dtype: str = "auto") -> torch.dtype:
        """The dtype the base is loaded in to train at `precision` (resolved: bf16 or fp32): bf16 weights
        in bf16 (unless `base_dtype` fp32 keeps them fp32 under bf16 autocast), else fp32. Full
        fine-tuning overrides it (fp32 master weights)."""
        if precision == "bf16" and not (self.float_base and base_dtype == "fp32"):
            return torch.bfloat16
        return torch.float32

    def stored_dtype(self, precision: str, base_dtype: str) -> torch.dtype | None:
        """The dtype the frozen linear and embedding weights are stored in when it is not the one they compute
        in: bf16 for `base_dtype` bf16 (resolved) at precision fp32 (tailor.models.upcast); else None."""
        if self.float_base and precision == "fp32" and base_dtype == "bf16":
            return torch.bfloat16
        return None

    def load_base(self, name: str, dtype: torch.dtype, device: str | None = None,
                  stored: torch.dtype | None = None) -> tuple[nn.Module, Any]:
        """(model, tokenizer) with the weights stored as this method uses them (quantized for QLoRA; with
        `stored`, the linear and embedding weights in that dtype, computed in `dtype`), loaded lean: never
        the whole model in a wider dtype first (tailor.models.lean)."""
        from tailor.models import load_model

        return load_model(name, dtype=dtype, device=device, quantize=self.base_quantization, stored=stored)

    def prepare(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        """`model` made ready to train by this method: adapted, then the settings every method shares."""
        model = self.adapt(model, config)
        if next(model.parameters()).device.type == "cpu" and hasattr(model, "set_attn_implementation"):
            # On CPU, transformers' SDPA path costs ~20% of a step at these lengths; eager attention measured
            # +9% tokens per CPU-second alone and +27% with the autocast fix in lora/layer.py (benchmarks/).
            model.set_attn_implementation("eager")
        if config.gradient_checkpointing:
            enable_activation_checkpointing(model)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        return model

    def frozen_weight_bytes(self, model: nn.Module) -> int:
        """Bytes the frozen weights occupy (a quantized base overrides this to count its packed storage)."""
        return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)

    def deliverable_dir(self, run_dir: Path) -> Path:
        """Where a run of this method keeps its result: run_dir/adapter or run_dir/model."""
        return Path(run_dir) / self.spec.deliverable

    def export(self, model: nn.Module, directory: Path, tokenizer: Any) -> Path:
        """A plain transformers model directory (weights, config, tokenizer) with the deliverable merged."""
        plain = self.merged(model)
        with atomic_output(directory, directory=True) as tmp:
            plain.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return Path(directory)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward instead of storing its activations (non-reentrant:
    works with a frozen embedding, whose output does not require grad)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def cast_weights(model: nn.Module, dtype) -> nn.Module:
    """Parameters to `dtype`, buffers left as they are. Why not `model.to(dtype)`: it also rounds the
    rotary `inv_freq` buffer, which transformers keeps in fp32 when it loads a model in bf16, so a model
    trained after `.to(bf16)` would see other positions than the same model at inference."""
    for parameter in model.parameters():
        if parameter.is_floating_point():  # packed quantized weights (uint8/int8) stay as they are
            parameter.data = parameter.data.to(dtype)
    return model


def set_trainable(model: nn.Module, trainable: bool) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(trainable)


__all__ = ["TrainingMethod", "cast_weights", "enable_activation_checkpointing", "set_trainable"]
