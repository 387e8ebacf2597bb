"""Load models from this machine only: local directories, the local HF cache, GGUF files, the default."""

from tailor.models.gguf_cache import GGUFConversionError, cached_gguf_dir, tailor_cache_dir
from tailor.models.load import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_REPO,
    ModelLoadError,
    ModelNotFoundError,
    ResolvedModel,
    default_device,
    fast_dtype,
    load_model,
    load_tokenizer,
    parse_dtype,
    resolve_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_REPO",
    "GGUFConversionError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ResolvedModel",
    "cached_gguf_dir",
    "default_device",
    "fast_dtype",
    "load_model",
    "load_tokenizer",
    "parse_dtype",
    "resolve_model",
    "tailor_cache_dir",
]
