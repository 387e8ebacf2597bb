"""The files of an adapter directory: PEFT's two (config and weights, or PEFT's older pickled weights),
tailor's metadata beside them, and a README. One home for the names, torch-free, so that the store (which
must stay quick for `tailor adapters list`) and the format and metadata modules read the same ones; and the
light check of a directory's files that the store runs before it takes an adapter in."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from tailor.adapters.refs import StoreError

CONFIG_NAME = "adapter_config.json"  # PEFT's adapter config
WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's adapter weights
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's older pickled weights: read, never written
METADATA_NAME = "tailor_metadata.json"  # tailor's record of the base, the run and the lineage
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, METADATA_NAME, "README.md")  # in store order

def read_store_json(path: Path, fix: str) -> Any:
    """A JSON file's content, None when it does not exist; a StoreError naming the file and `fix` when it
    cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: unreadable ({type(exc).__name__}: {exc}); {fix}") from None


def check_adapter_dir(directory: Path) -> dict[str, Any]:
    """A light check of an adapter directory before it enters the store (no torch): the config is a
    LoRA config and the weights file is a readable safetensors file. Returns the config."""
    if not directory.is_dir():
        what = "does not exist" if not directory.exists() else "is not a directory"
        raise StoreError(f"{directory} {what}; pass an adapter directory (one that holds {CONFIG_NAME} and "
                         f"{WEIGHTS_NAME}, e.g. RUN_DIR/adapter).")
    config = read_store_json(directory / CONFIG_NAME, "save the adapter again.")
    if config is None:
        hint = f" It is a run directory: pass {directory / 'adapter'}." \
            if (directory / "adapter" / CONFIG_NAME).is_file() else ""
        raise StoreError(f"{directory} holds no {CONFIG_NAME}: not an adapter directory.{hint}")
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise StoreError(f"{directory / CONFIG_NAME}: not a LoRA adapter config (peft_type {kind!r}); the "
                         "store keeps LoRA adapters.")
    weights = directory / WEIGHTS_NAME
    if weights.is_file():
        try:
            with open(weights, "rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(size))
            if not isinstance(header, dict) or not header:
                raise ValueError("empty header")
        except (OSError, ValueError, struct.error) as exc:
            raise StoreError(f"{weights}: not a readable safetensors file ({exc}); it is corrupt or "
                             "truncated: save the adapter again.") from None
    elif not (directory / PICKLE_WEIGHTS_NAME).is_file():
        raise StoreError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}: the weights are missing. "
                         "Copy the whole adapter directory again.")
    return config



__all__ = ["ADAPTER_FILES", "CONFIG_NAME", "METADATA_NAME", "PICKLE_WEIGHTS_NAME", "WEIGHTS_NAME",
           "check_adapter_dir", "read_store_json"]
