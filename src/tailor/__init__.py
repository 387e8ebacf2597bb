"""tailor: adapt an open language model to your task on one machine."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tailor._version import __version__

# Public API, imported lazily so that `import tailor` (and `tailor --help`) does not pay for torch.
_EXPORTS = {
    "LoraConfig": "tailor.lora", "add_lora": "tailor.lora", "merge_lora": "tailor.lora",
    "unmerge_lora": "tailor.lora", "unload_lora": "tailor.lora", "trainable_parameters": "tailor.lora",
    "save_adapter": "tailor.adapters", "load_adapter": "tailor.adapters",
    "combine_adapters": "tailor.adapters.combine",
}
__all__ = [
    "__version__", "LoraConfig", "add_lora", "save_adapter", "load_adapter", "merge_lora", "unmerge_lora",
    "unload_lora", "trainable_parameters", "combine_adapters",
]

if TYPE_CHECKING:
    from tailor.adapters import load_adapter, save_adapter
    from tailor.adapters.combine import combine_adapters
    from tailor.lora import LoraConfig, add_lora, merge_lora, trainable_parameters, unload_lora, unmerge_lora


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tailor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
