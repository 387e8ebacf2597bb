"""LoRA: a trainable low-rank update on a frozen base (tailor.lora), delivered as a PEFT-format adapter."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tailor.config.sections import init_lora_weights_value
from tailor.hardware import precision_for
from tailor.lora import LoraConfig, add_lora, unload_lora
from tailor.methods.base import TrainingMethod, cast_weights

if TYPE_CHECKING:
    from tailor.config import TrainConfig


def lora_config_for(model: nn.Module, config: TrainConfig) -> LoraConfig:
    """The LoraConfig a TrainConfig describes (PEFT's names; base recorded for the adapter_config.json)."""
    return LoraConfig(
        r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.target_modules, use_rslora=config.use_rslora, use_dora=config.use_dora,
        init_lora_weights=init_lora_weights_value(config.init_lora_weights),
        base_model_name_or_path=getattr(model.config, "_name_or_path", None) or config.model,
        task_type="CAUSAL_LM",
    )


def start_adapter(model: nn.Module, config: TrainConfig) -> None:
    """The adapter a run trains: a new one as the config shapes it, or the `init_adapter` it trains on
    (its own shape); for DPO from a starting adapter, a frozen copy of it beside it is the reference
    (tailor.loss.preference)."""
    if config.init_adapter is None:
        add_lora(model, lora_config_for(model, config))
        return
    from tailor.adapters import load_adapter
    from tailor.lora import set_active_adapters
    from tailor.loss.preference import REFERENCE_ADAPTER

    load_adapter(model, config.init_adapter)
    if config.objective == "dpo":
        load_adapter(model, config.init_adapter, name=REFERENCE_ADAPTER)
        set_active_adapters(model, "default")  # trainable; the reference frozen


class LoraMethod(TrainingMethod):
    """Precision (why): in bf16 the frozen base is *stored* in bf16 (half the memory, no per-step weight
    casts); the adapter weights stay fp32 (they are the optimizer's master copy) and autocast runs their
    matmuls in bf16. In fp32 (auto where bf16 is not native) the frozen base's linear and embedding weights
    are stored bf16 too (`base_dtype` auto) and upcast to fp32 per matmul (tailor.models.upcast): half the
    memory, measured as fast as an fp32-stored base (benchmarks/base_dtype.py, docs/precision.md); norms
    and adapters are fp32. `base_dtype: fp32` keeps the base fp32 (under bf16 autocast at precision bf16).
    """

    def adapt(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        bf16 = precision_for(config.precision, next(model.parameters()).device.type) == "bf16"
        if bf16 and config.base_dtype != "fp32":
            cast_weights(model, torch.bfloat16)
        start_adapter(model, config)
        return model

    def save(self, model: nn.Module, directory: Path, tokenizer: Any = None) -> Path:
        from tailor.adapters import save_adapter

        return save_adapter(model, directory)

    def attach(self, base: nn.Module, directory: Path) -> nn.Module:
        from tailor.adapters import load_adapter

        load_adapter(base, directory)
        return base

    def merged(self, model: nn.Module) -> nn.Module:
        from tailor.models.upcast import restore_full_precision

        # a bf16-stored base computing in fp32 becomes a plain fp32 model before the merge: the adapter is
        # folded in fp32, not rounded to bf16 (a bf16 base trained at precision bf16 stays bf16)
        return unload_lora(restore_full_precision(model), merge=True)
