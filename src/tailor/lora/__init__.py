"""The LoRA core: config, layers, injection into any transformers model, merge/unmerge/unload.

Imports nothing else of tailor (everything else depends on this package, not the other way round).
"""

from .config import ALL_LINEAR, LoraConfig, LoraConfigError
from .inject import (
    LoraPlan,
    LoraTargetError,
    active_adapters,
    add_lora,
    delete_adapter,
    disable_adapters,
    lora_configs,
    lora_layers,
    plan_lora,
    set_active_adapters,
    trainable_parameters,
)
from .layer import LoraEmbedding, LoraLayer, LoraLinear, lora_scaling, lora_term
from .merge import UnsafeMergeError, merge_lora, unload_lora, unmerge_lora
from .modules_to_save import ModulesToSaveWrapper
from .rows import NO_ADAPTER, LoraSlots, SlotError, add_lora_slots

__all__ = [
    "ALL_LINEAR", "LoraConfig", "LoraConfigError", "LoraPlan", "LoraTargetError", "active_adapters",
    "add_lora", "delete_adapter", "disable_adapters", "lora_configs", "lora_layers", "plan_lora",
    "set_active_adapters",
    "trainable_parameters", "LoraEmbedding", "LoraLayer", "LoraLinear", "lora_scaling", "lora_term",
    "UnsafeMergeError", "merge_lora", "unload_lora", "unmerge_lora", "ModulesToSaveWrapper",
    "NO_ADAPTER", "LoraSlots", "SlotError", "add_lora_slots",
]
