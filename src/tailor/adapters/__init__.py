"""Adapters as artifacts: PEFT's on-disk format (save, load), tailor's metadata beside it, combination,
and the adapter store.

Names are imported lazily, so that the store's command line (`tailor adapters list`) does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AdapterFormatError": "format", "AdapterShapeError": "format", "adapter_state_dict": "format",
    "config_from_peft_dict": "format", "config_to_peft_dict": "format", "load_adapter": "format",
    "read_adapter_config": "format", "save_adapter": "format",
    "AdapterBaseMismatchError": "metadata", "AdapterDtypeWarning": "metadata",
    "AdapterMetadataError": "metadata", "base_fingerprint": "metadata", "read_metadata": "metadata",
    "CombineError": "combine", "combine_adapters": "combine",
    "AdapterStore": "store", "StoreError": "store", "resolve": "store",
}
__all__ = [
    "AdapterBaseMismatchError", "AdapterDtypeWarning", "AdapterFormatError", "AdapterMetadataError",
    "AdapterShapeError", "AdapterStore", "CombineError", "StoreError", "adapter_state_dict",
    "base_fingerprint", "combine_adapters", "config_from_peft_dict", "config_to_peft_dict", "load_adapter",
    "read_adapter_config", "read_metadata", "resolve", "save_adapter",
]

if TYPE_CHECKING:
    from .combine import CombineError, combine_adapters
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
    from .metadata import (
        AdapterBaseMismatchError,
        AdapterDtypeWarning,
        AdapterMetadataError,
        base_fingerprint,
        read_metadata,
    )
    from .store import AdapterStore, StoreError, resolve


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
