"""What tailor knows about an adapter, kept beside PEFT's two files in `tailor_metadata.json`.

PEFT and vLLM read only ``adapter_config.json`` and ``adapter_model.safetensors``, so the extra file
changes nothing for them. It records:

- ``base``: which base model the adapter belongs to: its name, a hash of its architecture config and a
  weight checksum (see `base_fingerprint`), so that `load_adapter` can refuse another base;
- ``precision``: the dtype (and quantization) of the base the adapter was trained on, and the adapter's;
- ``train_config``, ``data`` (a hash of the training data), ``metrics``: written by `tailor train`;
- ``parents`` and ``combination``: written by `tailor combine` (lineage);
- ``routing``: what the adapter was trained on, for ``model: "auto"`` in `tailor serve` (tailor.routing),
  written by `tailor train` and `tailor adapters describe`;
- ``created`` and ``tailor_version``.

An adapter without the file (PEFT's own) loads as before, unchecked.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tailor.adapters.layout import METADATA_NAME
from tailor.files import atomic_write_json
from tailor.lora.layer import LoraLayer
from tailor.lora.modules_to_save import ModulesToSaveWrapper

METADATA_FORMAT = 1
FINGERPRINT_ROWS = 256  # evenly spaced rows of the input embedding that enter the weight checksum
# Dtypes whose bf16 rounding is the same whichever of them the base was loaded in: an fp32 weight rounded
# to bf16 is exactly the bf16 weight tailor trains on. (fp16 rounds differently: not comparable.)
COMPARABLE_DTYPES = ("float32", "bfloat16")
# Config entries that describe a run or a tokenizer, not the weights: they differ between the moment of
# training (use_cache off, eager attention) and of loading, or between a built and a loaded model.
RUNTIME_CONFIG_KEYS = {
    "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "pad_token_id", "bos_token_id", "eos_token_id", "id2label",
    "label2id", "problem_type", "chunk_size_feed_forward", "tokenizer_class", "quantization_config",
    "name_or_path", "attn_implementation", "torchscript", "task_specific_params",
}


class AdapterMetadataError(ValueError):
    """The metadata file of an adapter is unreadable (names the file and the fix)."""


class AdapterBaseMismatchError(ValueError):
    """The adapter was trained on another base model than the one it is being loaded into."""


class AdapterDtypeWarning(UserWarning):
    """The adapter is loaded into a base of another dtype than it was trained with."""


class CanaryAdapterWarning(UserWarning):
    """The adapter was trained with planted fake secrets (`tailor train --canaries`): a leakage test, not
    an adapter to serve or merge."""


def _tailor_version() -> str:
    from tailor._version import __version__

    return __version__


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------- fingerprint
def _plain(module: nn.Module | None) -> nn.Module | None:
    """The frozen base module behind a LoRA or modules_to_save wrapper."""
    if isinstance(module, LoraLayer):
        return module.base_layer
    if isinstance(module, ModulesToSaveWrapper):
        return module.original_module
    return module


def _canonical(path: str) -> str:
    return path.replace(".base_layer", "").replace(".original_module", "")


def fingerprint_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors the weight checksum covers: evenly spaced rows of the input embedding and every norm
    weight. Neither is ever quantized (bitsandbytes replaces nn.Linear only) nor trained by LoRA, so a
    QLoRA base, a bf16 and an fp32 copy of one model give the same checksum; a different model (or a full
    fine-tune of it) changes both."""
    found: list[tuple[str, torch.Tensor]] = []
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embedding = _plain(get_embeddings()) if callable(get_embeddings) else None
    weight = getattr(embedding, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point():
        n = weight.shape[0]
        rows = torch.linspace(0, n - 1, steps=min(n, FINGERPRINT_ROWS)).round().long().unique()
        found.append(("input_embeddings", weight.detach()[rows.to(weight.device)]))
    for path, module in model.named_modules():
        if ".modules_to_save." in f".{path}." or "Norm" not in type(module).__name__:
            continue
        norm_weight = getattr(module, "weight", None)
        if isinstance(norm_weight, torch.Tensor) and norm_weight.is_floating_point():
            found.append((f"{_canonical(path)}.weight", norm_weight.detach()))
    return found


def _config_hash(model: nn.Module) -> tuple[str | None, str | None]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None, None
    values = {k: v for k, v in config.to_dict().items()
              if k not in RUNTIME_CONFIG_KEYS and not k.startswith("_")}
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), values.get("model_type")


def base_dtype(model: nn.Module) -> str | None:
    """The dtype of the base weights (read from the input embedding, which is never quantized)."""
    tensors = fingerprint_tensors(model)
    if tensors:
        return str(tensors[0][1].dtype).removeprefix("torch.")
    floats = [p for p in model.parameters() if p.is_floating_point() and not p.requires_grad]
    return str(floats[0].dtype).removeprefix("torch.") if floats else None


def base_quantization(model: nn.Module) -> str | None:
    """"nf4" / "int8" when the base's linear layers are bitsandbytes layers, else None (no bnb import)."""
    for module in model.modules():
        name = type(module).__name__
        if name == "Linear4bit":
            return str(getattr(getattr(module.weight, "quant_state", None), "quant_type", None) or "4bit")
        if name == "Linear8bitLt":
            return "int8"
    return None


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Name, config hash and weight checksum of the base under `model`'s adapters (cheap: a few hundred
    embedding rows and the norm weights, hashed as bf16 so that fp32 and bf16 copies agree)."""
    config_sha, model_type = _config_hash(model)
    tensors = fingerprint_tensors(model)
    digest = None
    if tensors:
        h = hashlib.sha256()
        for name, tensor in tensors:
            canonical = tensor.to(device="cpu", dtype=torch.bfloat16).contiguous()
            h.update(f"{name}:{tuple(canonical.shape)};".encode())
            h.update(canonical.view(torch.int16).numpy().tobytes())
        digest = h.hexdigest()
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "name_or_path", None)
    n_norms = max(len(tensors) - 1, 0)
    return {
        "name": name or None,
        "model_type": model_type,
        "config_sha256": config_sha,
        "weights_sha256": digest,
        "weights_checked": f"{min(FINGERPRINT_ROWS, _vocab(tensors))} input-embedding rows and {n_norms} "
                           "norm weights, as bfloat16",
        "dtype": base_dtype(model),
    }


def _vocab(tensors: list[tuple[str, torch.Tensor]]) -> int:
    return tensors[0][1].shape[0] if tensors and tensors[0][0] == "input_embeddings" else 0


def describe_base(base: dict[str, Any] | None) -> str:
    if not base:
        return "an unknown base"
    short = lambda h: (h or "?")[:12]  # noqa: E731
    return (f"{base.get('name') or '(unnamed)'!r} ({base.get('model_type') or '?'}; config "
            f"{short(base.get('config_sha256'))}, weights {short(base.get('weights_sha256'))})")


def same_base(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two fingerprints name the same base (unknown parts are not held against it)."""
    if not a or not b:
        return True
    if a.get("config_sha256") and b.get("config_sha256") and a["config_sha256"] != b["config_sha256"]:
        return False
    comparable = a.get("dtype") in COMPARABLE_DTYPES and b.get("dtype") in COMPARABLE_DTYPES
    weights_a, weights_b = a.get("weights_sha256"), b.get("weights_sha256")
    return not (comparable and weights_a and weights_b and weights_a != weights_b)


# ---------------------------------------------------------------------------------------------- the file
def new_metadata(model: nn.Module | None = None, **fields: Any) -> dict[str, Any]:
    """A metadata record: base fingerprint and precision from `model` (when given), then `fields`."""
    record: dict[str, Any] = {
        "format": METADATA_FORMAT, "tailor_version": _tailor_version(), "created": now_iso(),
        "base": None, "precision": None, "train_config": None, "data": None, "metrics": None,
        "parents": [], "combination": None,
    }
    if model is not None:
        record["base"] = base_fingerprint(model)
        record["precision"] = {"base_dtype": record["base"]["dtype"], "base_quantization":
                               base_quantization(model), "adapter_dtype": "float32"}
    record.update(fields)
    return record


def metadata_text(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"


def read_metadata(directory: str | Path) -> dict[str, Any] | None:
    """The adapter's metadata record, or None when it has none (a PEFT adapter).

    Raises:
        AdapterMetadataError: the file exists but is unreadable or not a JSON object.
    """
    path = Path(directory) / METADATA_NAME
    if not path.exists():
        return None
    fix = (f"restore the file, or delete it to use the adapter without tailor's checks (PEFT's files "
           f"{Path(directory) / 'adapter_config.json'} and adapter_model.safetensors are unaffected)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterMetadataError(f"{path}: unreadable ({type(exc).__name__}: {exc}); {fix}.") from None
    if not isinstance(data, dict):
        raise AdapterMetadataError(f"{path}: expected a JSON object, got {type(data).__name__}; {fix}.")
    return data


def update_metadata(directory: str | Path, **fields: Any) -> dict[str, Any]:
    """Add `fields` to the adapter's metadata (creating the record if it has none), atomically."""
    record = read_metadata(directory) or new_metadata()
    record.update(fields)
    atomic_write_json(Path(directory) / METADATA_NAME, json.loads(metadata_text(record)))
    return record


def check_base(model: nn.Module, metadata: dict[str, Any] | None, source: str, force: bool = False) -> None:
    """Refuse to load an adapter into another base than it was trained on; warn on another dtype, and on
    an adapter trained with planted canaries (CanaryAdapterWarning).

    Raises:
        AdapterBaseMismatchError: config hash or weight checksum differ (unless `force`: then a warning).
    """
    canaries = (metadata or {}).get("canaries")
    if canaries:  # every load says it: tailor serve, merge, export, eval
        warnings.warn(f"Adapter {source} was {canaries.get('note')} ({canaries.get('n')} canaries, listed in "
                      f"the run's {canaries.get('file')}).", CanaryAdapterWarning, stacklevel=4)
    recorded = (metadata or {}).get("base")
    if not recorded:
        return
    current = base_fingerprint(model)
    if not same_base(recorded, current):
        message = (f"Adapter {source} was trained on base {describe_base(recorded)}, but this model is "
                   f"{describe_base(current)}: a different base model, so the adapter would compute "
                   "something else than it learned.")
        if not force:
            raise AdapterBaseMismatchError(
                f"{message} Load it into the base it was trained on (--model "
                f"{recorded.get('name') or 'BASE'}); if you know the two bases are the same weights, force "
                "it (force=True, --force)."
            )
        warnings.warn(f"{message} Loaded anyway (forced).", UserWarning, stacklevel=4)
    trained, loaded = recorded.get("dtype"), current.get("dtype")
    if trained and loaded and trained != loaded:
        warnings.warn(
            f"Adapter {source} was trained on a {trained} base and is loaded into a {loaded} one: outputs "
            f"can differ slightly from what training measured. Load the base in {trained} to match "
            "(--dtype).", AdapterDtypeWarning, stacklevel=4,
        )


__all__ = [
    "AdapterBaseMismatchError", "AdapterDtypeWarning", "AdapterMetadataError", "CanaryAdapterWarning",
    "METADATA_NAME",
    "base_fingerprint", "check_base", "describe_base", "fingerprint_tensors", "new_metadata",
    "read_metadata", "same_base", "update_metadata",
]
