"""Adapters on disk in PEFT's format (adapter_config.json + adapter_model.safetensors)."""

from .format import (
    AdapterFormatError,
    AdapterShapeError,
    adapter_state_dict,
    config_from_peft_dict,
    config_to_peft_dict,
    load_adapter,
    read_adapter_config,
    save_adapter,
)

__all__ = [
    "AdapterFormatError", "AdapterShapeError", "adapter_state_dict", "config_from_peft_dict",
    "config_to_peft_dict", "load_adapter", "read_adapter_config", "save_adapter",
]
