"""Convert a GGUF file once into a safetensors model directory in tailor's cache, then reuse it.

Why: transformers de-quantizes a GGUF on every `from_pretrained(..., gguf_file=...)` (about 20 s for the
135M default model on 2 CPU cores); the same weights saved as fp32 safetensors load in well under a
second. The cache directory is `$TAILOR_CACHE/models/<name>/` (default `~/.cache/tailor`). It records
which GGUF it came from (path, size, mtime); a different source file is converted again.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from tailor.files import OutputPathError, atomic_output, tailor_cache_dir

SOURCE_RECORD = "tailor_source.json"


def _source_record(gguf_path: Path) -> dict:
    stat = gguf_path.stat()
    return {"gguf": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _is_complete(directory: Path, record: dict) -> bool:
    try:
        saved = json.loads((directory / SOURCE_RECORD).read_text())
    except (OSError, ValueError):
        return False
    has_weights = any(directory.glob("*.safetensors"))
    return saved == record and (directory / "config.json").is_file() and has_weights


def cached_gguf_dir(gguf_path: str | Path, cache_name: str | None = None) -> Path:
    """The converted safetensors directory for `gguf_path`, converting it first if needed.

    cache_name: directory name under `<cache>/models/`; default `<file stem>-<hash of its path>` so two
    files with the same name do not collide.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if cache_name is None:
        digest = hashlib.sha256(str(gguf_path).encode()).hexdigest()[:12]
        cache_name = f"{gguf_path.stem}-{digest}"
    target = tailor_cache_dir() / "models" / cache_name
    record = _source_record(gguf_path)
    if _is_complete(target, record):
        return target
    try:
        convert_gguf(gguf_path, target, record)
    except OutputPathError as error:
        raise GGUFConversionError(f"{error} (tailor's cache for converted models is {tailor_cache_dir()}; "
                                  "set TAILOR_CACHE to a directory you can write to)") from None
    return target


GGUF_MAGIC = b"GGUF"


def _check_gguf_header(gguf_path: Path) -> None:
    """Refuse at once a file that is unreadable, empty or not a GGUF file at all (no magic bytes)."""
    try:
        with open(gguf_path, "rb") as handle:
            head = handle.read(len(GGUF_MAGIC))
    except OSError as error:
        raise GGUFConversionError(f"Could not load {gguf_path} as a causal language model: it cannot be "
                                  f"read ({error.strerror or error}); check that you may read it (ls -l).") \
            from None
    if head != GGUF_MAGIC:
        what = "it is empty" if not head else f"it does not start with the GGUF magic bytes ({head!r})"
        raise GGUFConversionError(f"Could not load {gguf_path} as a causal language model: {what}, so it is "
                                  "not a GGUF file (an interrupted download?). Fix: download or copy the "
                                  ".gguf file again, or pass a model directory.")


class GGUFConversionError(ValueError):
    """A .gguf file that transformers cannot read as a causal LM."""


def _dequantized_from_gguf(gguf_path: Path):
    """Model and tokenizer read from a GGUF, as a plain dense fp32 model with no quantization config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    directory, filename = str(gguf_path.parent), gguf_path.name
    _check_gguf_header(gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            gguf_file=filename,
            dtype=torch.float32,
            # Unpack every weight into a dense tensor: a packed GGUF layer cannot be saved or trained.
            quantization_config=GgufConfig(gguf_file=str(gguf_path), dequantize=True),
        )
    except Exception as error:  # a truncated or foreign file fails in the reader in many ways (struct, ...)
        if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
            raise
        detail = " ".join(str(error).split())[:300].rstrip(".")
        kind = type(error).__name__ if type(error).__name__ != "error" else f"{type(error).__module__}.error"
        raise GGUFConversionError(
            f"Could not load {gguf_path} as a causal language model ({kind}: {detail}). "
            "It is truncated or corrupt (download it again), or of an architecture transformers does not "
            "support: pass a GGUF of llama, qwen2, mistral, ..., or a model directory."
        ) from error
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # older loaders dequantize but still tag the model as quantized
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model, tokenizer


def convert_gguf(gguf_path: Path, target: Path, record: dict | None = None) -> None:
    """Write `target` (config, safetensors weights, tokenizer, source record) atomically.

    The files go to a temporary sibling directory (tailor.files.atomic_output) that is renamed into place, so
    a killed conversion leaves no half-written model behind; a stale `target` (another source file, or
    incomplete) is replaced whole; if another process finished first, its copy is kept.
    """
    # A one-time wait of tens of seconds: say what is happening and that it will not happen again.
    print(f"tailor: converting {gguf_path.name} once to {target} (later loads use it)", file=sys.stderr)
    model, tokenizer = _dequantized_from_gguf(gguf_path)
    record = record or _source_record(gguf_path)
    try:
        with atomic_output(target, directory=True) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=2))
            if _is_complete(target, record):  # another process converted it meanwhile: keep its copy
                raise _FinishedElsewhere
    except _FinishedElsewhere:
        pass
    except OSError:  # e.g. another process renamed its copy in between our check and our rename
        if not _is_complete(target, record):
            raise


class _FinishedElsewhere(Exception):
    """Abandons a conversion (its temporary is deleted) when another process already wrote the target."""
