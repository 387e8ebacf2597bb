"""Adapters on disk in PEFT's format: adapter_config.json + adapter_model.safetensors.

Keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (embeddings:
``.lora_embedding_A`` / ``.lora_embedding_B``), without the adapter name; modules_to_save copies are saved
whole under the module's own path (``base_model.model.classifier.weight``). So a tailor adapter loads with
``peft.PeftModel.from_pretrained`` and a PEFT adapter loads here, without conversion.

Differences from PEFT, on purpose: tailor never writes the base embedding matrix (PEFT does when an
embedding is targeted; tailor reads it back if present), and loading is strict: every tensor must fit
and be expected, or nothing is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tailor.lora import LoraConfig, LoraConfigError, add_lora, delete_adapter, lora_configs, plan_lora
from tailor.lora.inject import _wrappers, lora_layers
from tailor.lora.layer import LoraLayer, adapter_shapes, adapter_tensors
from tailor.lora.modules_to_save import ModulesToSaveWrapper

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, "README.md"}

# PEFT config keys that carry no meaning for loading plain LoRA weights.
INFORMATIONAL_KEYS = {
    "peft_type", "auto_mapping", "revision", "inference_mode", "peft_version", "megatron_core",
    "qalora_group_size", "loftq_config", "lora_ga_config", "corda_config", "eva_config",
}
# Fields written beside ours so the file reads like PEFT's; all have PEFT's "feature off" default.
PEFT_DEFAULTS: dict[str, Any] = {
    "auto_mapping": None, "inference_mode": True, "layer_replication": None, "loftq_config": {},
    "lora_bias": False, "megatron_config": None, "megatron_core": "megatron.core", "revision": None,
    "target_parameters": None, "trainable_token_indices": None, "use_dora": False,
}


class AdapterFormatError(ValueError):
    """An adapter directory is missing, unreadable or not a LoRA adapter tailor can load."""


class AdapterShapeError(AdapterFormatError):
    """The adapter's tensors do not fit the model (names the first module and both shapes)."""


# ---------------------------------------------------------------------------------------------- config
def config_to_peft_dict(config: LoraConfig) -> dict[str, Any]:
    """PEFT's adapter_config.json content for `config` (peft_type "LORA")."""
    data = dict(PEFT_DEFAULTS)
    data.update(config.to_dict())
    data["peft_type"] = "LORA"
    return data


def config_from_peft_dict(data: dict[str, Any], source: str = CONFIG_NAME) -> LoraConfig:
    """A LoraConfig from a PEFT adapter_config.json dict.

    Raises:
        AdapterFormatError: peft_type is not "LORA", or the adapter uses a PEFT feature tailor does not
            implement (DoRA, lora_bias, ...), or a field has a bad value.
    """
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFormatError(
            f"{source}: peft_type is {peft_type!r}; tailor loads LoRA adapters only (peft_type 'LORA')."
        )
    fields = set(LoraConfig.__dataclass_fields__)
    unsupported = {
        k: v for k, v in data.items()
        if k not in fields and k not in INFORMATIONAL_KEYS and v not in (None, False, {}, [], "")
    }
    if unsupported:
        raise AdapterFormatError(
            f"{source}: this adapter uses PEFT features tailor does not implement: {unsupported}. "
            "Load it with PEFT, or retrain it as plain LoRA."
        )
    values = {k: v for k, v in data.items() if k in fields}
    if values.get("init_lora_weights", True) not in (True, False, "gaussian"):
        raise AdapterFormatError(
            f"{source}: init_lora_weights={values['init_lora_weights']!r} (PiSSA, OLoRA, ...) may change the "
            "base weights; tailor only loads adapters with init_lora_weights true, false or 'gaussian'."
        )
    try:
        return LoraConfig(**values)
    except LoraConfigError as exc:
        raise AdapterFormatError(f"{source}: {exc}") from exc


def _read_config(directory: Path) -> LoraConfig:
    if not directory.is_dir():
        raise AdapterFormatError(f"Adapter directory {str(directory)!r} does not exist (or is a file).")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterFormatError(
            f"{str(path)!r} is missing: {str(directory)!r} is not a saved adapter; save_adapter writes one."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise AdapterFormatError(f"{path}: not valid JSON ({where}: {exc.msg}).") from exc
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return config_from_peft_dict(data, str(path))


# ---------------------------------------------------------------------------------------------- weights
def _read_weights(directory: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as exc:  # safetensors raises several types for truncated/garbled files
            raise AdapterFormatError(
                f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); it is corrupt or "
                "truncated: save the adapter again."
            ) from exc
    pickled = directory / PICKLE_WEIGHTS_NAME
    if pickled.is_file():
        if not allow_pickle:
            raise AdapterFormatError(
                f"{pickled} is a pickle file, which can run code when loaded; tailor does not unpickle by "
                "default. If you trust it, pass allow_pickle=True (then torch.load(weights_only=True)), "
                "or convert it to adapter_model.safetensors."
            )
        try:
            state = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterFormatError(f"{pickled} could not be loaded with weights_only=True: {exc}") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterFormatError(f"{pickled} does not hold a {{name: tensor}} state dict.")
        return state
    raise AdapterFormatError(
        f"{str(directory)!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}: the adapter weights are missing."
    )


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's on-disk keys (detached CPU copies)."""
    configs = lora_configs(model)
    if name not in configs:
        raise ValueError(f"The model has no adapter {name!r}; it has {sorted(configs)}.")
    state: dict[str, torch.Tensor] = {}
    for key, layer in lora_layers(model).items():
        if name in layer.adapter_names:
            for suffix, tensor in adapter_tensors(layer, name).items():
                state[f"{key}.{suffix}"] = tensor
            if configs[name].bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                state[f"{key}.base_layer.bias"] = layer.base_layer.bias
    wrappers = _wrappers(model)
    for key, wrapper in wrappers.items():
        if name in wrapper.adapter_names:
            for k, tensor in wrapper.modules_to_save[name].state_dict().items():
                state[f"{key}.{k}"] = tensor
    if configs[name].bias == "all":
        for key, p in model.named_parameters():
            inside_wrapper = any(key.startswith(f"{w}.") for w in wrappers)
            if (key == "bias" or key.endswith(".bias")) and not inside_wrapper:
                state[key] = p
    return {PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------- save
def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter `name` in PEFT's format, atomically.

    Files are written into a temporary directory next to `directory`, which is then renamed into place;
    an existing adapter directory is swapped out as a whole. If `directory` holds other files too, each
    adapter file is replaced atomically on its own. A crash never leaves a half-written adapter.
    """
    directory = Path(directory)
    state = adapter_state_dict(model, name)
    config = config_to_peft_dict(lora_configs(model)[name])
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _move_into_place(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _move_into_place(tmp: Path, directory: Path) -> None:
    if not directory.exists():
        os.replace(tmp, directory)
        return
    if not directory.is_dir():
        raise AdapterFormatError(f"{str(directory)!r} exists and is not a directory.")
    if {p.name for p in directory.iterdir()} <= ADAPTER_FILES:  # only an old adapter there: swap whole dirs
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        os.replace(directory, old / directory.name)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
        return
    # Shared directory (e.g. a run folder): replace the weights, then the config, each atomically.
    (directory / PICKLE_WEIGHTS_NAME).unlink(missing_ok=True)
    os.replace(tmp / WEIGHTS_NAME, directory / WEIGHTS_NAME)
    os.replace(tmp / CONFIG_NAME, directory / CONFIG_NAME)


# ---------------------------------------------------------------------------------------------- load
def _base_param(state: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
    """The model tensor a saved non-LoRA key (bias, embedding base weight) belongs to, wrapped or not."""
    for candidate in (key, key.replace(".base_layer.", ".")):
        if candidate in state:
            return state[candidate]
    parts = key.rsplit(".", 1)
    if len(parts) == 2:  # the module may already be wrapped by another adapter
        wrapped = f"{parts[0]}.base_layer.{parts[1]}"
        return state.get(wrapped)
    return None


def _check_fit(model: nn.Module, config: LoraConfig, weights: dict[str, torch.Tensor], source: str):
    """Check every tensor against the model before anything changes; returns the plan."""
    plan = plan_lora(model, config)
    expected: dict[str, tuple[int, ...]] = {}
    for key, module, r, _ in plan.targets:
        for suffix, shape in adapter_shapes(module, r).items():
            expected[f"{key}.{suffix}"] = shape
    for key, module in plan.modules_to_save:
        original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        for k, tensor in original.state_dict().items():
            expected[f"{key}.{k}"] = tuple(tensor.shape)
    extras = {}  # biases (bias != "none") and embedding base weights (PEFT's save_embedding_layers)
    params = dict(model.named_parameters())
    for key in weights:
        if key not in expected:
            param = _base_param(params, key)
            if param is not None and (key.endswith("bias") or key.endswith("base_layer.weight")):
                extras[key] = param
                expected[key] = tuple(param.shape)
    for key, shape in expected.items():
        if key in weights and tuple(weights[key].shape) != shape:
            module, _, _ = key.rpartition(".lora_") if ".lora_" in key else key.rpartition(".")
            raise AdapterShapeError(
                f"Adapter {source} does not fit this model: module {module!r} tensor "
                f"{key.removeprefix(module + '.')!r} has shape {tuple(weights[key].shape)} in the file but "
                f"the model needs {shape}. Trained on another base model? The model was not changed."
            )
    missing = [k for k in expected if k not in weights and k not in extras]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise AdapterShapeError(
            f"Adapter {source} does not fit this model: "
            + (f"{len(missing)} tensor(s) missing from the file, e.g. {missing[:3]}; " if missing else "")
            + (f"{len(unexpected)} tensor(s) for modules the model lacks, e.g. {unexpected[:3]}; "
               if unexpected else "")
            + "was it saved from a different base model or target_modules? The model was not changed."
        )
    non_float = [k for k, v in weights.items() if not v.is_floating_point()]
    if non_float:
        raise AdapterFormatError(f"Adapter {source}: tensors {non_float[:3]} are not floating point.")
    return plan, extras


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, name: str | None = None, allow_pickle: bool = False,
) -> str:
    """Add the adapter saved in `directory` (tailor or PEFT) to `model` as `name`; it becomes active.

    All or nothing: config, files and every tensor shape are checked before the model is touched.
    Returns the adapter name ("default" unless given).

    Raises:
        AdapterFormatError: missing/corrupt files, unknown peft_type, unsupported features, pickled
            weights without ``allow_pickle=True``.
        AdapterShapeError: the tensors do not fit the model (first module and both shapes named).
        LoraTargetError: the adapter's target modules do not exist in the model.
    """
    directory = Path(directory)
    name = "default" if name is None else name
    if name in lora_configs(model):
        raise ValueError(f"The model already has an adapter named {name!r}; pass another name=.")
    config = _read_config(directory)
    raw = _read_weights(directory, allow_pickle)
    weights = {k.removeprefix(PREFIX): v for k, v in raw.items()}
    _, extras = _check_fit(model, config, weights, str(directory))
    add_lora(model, config, name)
    try:
        _copy_weights(model, name, weights, extras)
    except Exception:
        delete_adapter(model, name)
        raise
    return name


@torch.no_grad()
def _copy_weights(model: nn.Module, name: str, weights: dict[str, torch.Tensor], extras: dict) -> None:
    for key, layer in lora_layers(model).items():
        if isinstance(layer, LoraLayer) and name in layer.adapter_names:
            for suffix, param in adapter_tensors(layer, name).items():
                param.copy_(weights[f"{key}.{suffix}"].to(param.dtype))
    for key, wrapper in _wrappers(model).items():
        if name in wrapper.adapter_names:
            copy = wrapper.modules_to_save[name]
            sub = {k: weights[f"{key}.{k}"] for k in copy.state_dict()}
            copy.load_state_dict(sub, strict=True)
    for key, param in extras.items():
        param.copy_(weights[key].to(param.dtype))
