"""Adapters on disk in PEFT's format: adapter_config.json + adapter_model.safetensors.

Keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (embeddings:
``.lora_embedding_A`` / ``.lora_embedding_B``; DoRA adapters also ``.lora_magnitude_vector``, with
``use_dora: true`` in the config), without the adapter name; modules_to_save copies are saved
whole under the module's own path (``base_model.model.classifier.weight``). So a tailor adapter loads with
``peft.PeftModel.from_pretrained`` and a PEFT adapter loads here, without conversion.

Differences from PEFT, on purpose: tailor never writes the base embedding matrix (PEFT does when an
embedding is targeted; tailor reads it back if present), and loading is strict: every tensor must fit
and be expected, or nothing is loaded.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tailor.adapters.layout import (
    ADAPTER_FILES,
    CONFIG_NAME,
    METADATA_NAME,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
)
from tailor.adapters.metadata import (
    AdapterMetadataError,
    check_base,
    metadata_text,
    new_metadata,
    read_metadata,
)
from tailor.files import atomic_output, atomic_write_text
from tailor.lora import LoraConfig, LoraConfigError, add_lora, delete_adapter, lora_configs, plan_lora
from tailor.lora.experts import LoraParam, saved_paths, strip_base_layer
from tailor.lora.experts import adapter_shapes as parameter_shapes
from tailor.lora.initialisation import changes_base, on_original_base, on_original_base_config
from tailor.lora.inject import _wrappers, lora_layers
from tailor.lora.layer import LoraLayer, adapter_shapes, adapter_tensors
from tailor.lora.modules_to_save import ModulesToSaveWrapper

PREFIX = "base_model.model."

# PEFT config keys that carry no meaning for loading plain LoRA weights.
INFORMATIONAL_KEYS = {
    "peft_type", "auto_mapping", "revision", "inference_mode", "peft_version", "megatron_core",
    "qalora_group_size", "loftq_config", "lora_ga_config", "corda_config", "eva_config",
}
# Fields written beside ours so the file reads like PEFT's; all have PEFT's "feature off" default.
PEFT_DEFAULTS: dict[str, Any] = {
    "auto_mapping": None, "inference_mode": True, "layer_replication": None, "loftq_config": {},
    "lora_bias": False, "megatron_config": None, "megatron_core": "megatron.core", "revision": None,
    "trainable_token_indices": None, "use_dora": False,
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
            implement (lora_bias, ...), or a field has a bad value.
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
            f"{source}: init_lora_weights={values['init_lora_weights']!r} (PiSSA, OLoRA, ...) was saved for "
            "its residual base, not the original; tailor only loads adapters with init_lora_weights true, "
            "false or 'gaussian'. Save it from PEFT with path_initial_model_for_weight_conversion (tailor's "
            "own PiSSA/OLoRA adapters are saved so)."
        )
    try:
        return LoraConfig(**values)
    except LoraConfigError as exc:
        raise AdapterFormatError(f"{source}: {exc}") from exc


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """The LoraConfig of the adapter saved in `directory`, checked without a model (cheap: call it before
    loading a base model, so that a wrong adapter path fails in a second, not after the model load).

    Raises:
        AdapterFormatError: the directory is missing, a file, empty, not an adapter (a run directory or a
            model directory: the message says what to pass instead), or its adapter_config.json is
            unreadable, empty, not JSON, or not a LoRA config.
    """
    return _read_config(Path(directory))


def _read_config(directory: Path) -> LoraConfig:
    shown = str(directory)
    if not directory.exists():
        raise AdapterFormatError(f"Adapter directory {shown!r} does not exist. Check the path; an adapter "
                                 f"directory holds {CONFIG_NAME} and {WEIGHTS_NAME} (tailor train writes "
                                 "one to RUN_DIR/adapter).")
    if not directory.is_dir():
        hint = f" Pass the directory that holds it: {str(directory.parent)!r}." \
            if directory.name in ADAPTER_FILES else ""
        raise AdapterFormatError(f"{shown!r} is a file, not an adapter directory (one that holds "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME}).{hint}")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterFormatError(f"{str(path)!r} is missing: {shown!r} is not a saved adapter. "
                                 f"{_not_an_adapter_hint(directory)}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AdapterFormatError(f"{path}: not UTF-8 JSON text ({exc.reason} at byte {exc.start}); the file "
                                 "is corrupt: save the adapter again or restore the file.") from None
    except OSError as exc:
        raise AdapterFormatError(f"{path}: cannot be read ({exc.strerror or exc}); check that you may read "
                                 "it (ls -l).") from None
    if not text.strip():
        raise AdapterFormatError(f"{path}: the file is empty (an interrupted copy?); save the adapter again "
                                 "or restore the file.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise AdapterFormatError(f"{path}: not valid JSON ({where}: {exc.msg}); the file is corrupt: save "
                                 "the adapter again or fix the JSON there.") from exc
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(data).__name__}; save the "
                                 "adapter again.")
    return config_from_peft_dict(data, str(path))


def _not_an_adapter_hint(directory: Path) -> str:
    """What to pass instead of `directory`, judged from what it holds."""
    if (directory / "adapter" / CONFIG_NAME).is_file():
        return f"It is a run directory: pass its adapter, {str(directory / 'adapter')!r}."
    if (directory / "config.json").is_file():
        return "It looks like a model directory: pass it as the model (--model), not as an adapter."
    if directory.is_dir() and not any(directory.iterdir()):
        return "The directory is empty: pass the directory that save_adapter or tailor train wrote."
    return f"Pass a directory that holds {CONFIG_NAME} and {WEIGHTS_NAME} (save_adapter writes one)."


# ---------------------------------------------------------------------------------------------- weights
def _read_weights(directory: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if path.exists() and not path.is_file():
        raise AdapterFormatError(f"{path} is not a file (a directory?); it must be the safetensors file of "
                                 "the adapter weights: copy the adapter directory again, or save it again.")
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as exc:  # safetensors raises several types for truncated/garbled files
            raise AdapterFormatError(
                f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); it is corrupt or "
                "truncated: save the adapter again."
            ) from exc
        return _check_finite(weights, path)
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
            raise AdapterFormatError(f"{pickled} could not be loaded with weights_only=True: {exc}; it is "
                                     "corrupt, or not a weights file: save the adapter again.") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterFormatError(f"{pickled} does not hold a {{name: tensor}} state dict; save the "
                                     "adapter again (as adapter_model.safetensors).")
        return _check_finite(state, pickled)
    raise AdapterFormatError(
        f"{str(directory)!r} has {CONFIG_NAME} but no {WEIGHTS_NAME} file: the adapter weights are missing. "
        "Copy the whole adapter directory again, or save the adapter again."
    )


def _check_finite(weights: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Refuse weights holding NaN or infinity: loaded, they would turn every output into NaN."""
    for key, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = tensor.detach().float()
            what = ", ".join(f"{int(n)} {label}" for label, n in (
                ("NaN", torch.isnan(bad).sum()), ("+inf", torch.isposinf(bad).sum()),
                ("-inf", torch.isneginf(bad).sum())) if n)
            raise AdapterFormatError(
                f"{source}: tensor {key!r} is not finite ({what} of {tensor.numel()} values); the adapter "
                "is broken (training diverged, or the file was damaged). Use an earlier checkpoint or "
                "retrain (a lower learning rate helps). The model was not changed."
            )
    return weights


def read_adapter_weights(directory: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their on-disk keys, checked finite, without a model (the server reads
    adapters so). Raises AdapterFormatError as `load_adapter` does for missing, corrupt or pickled files."""
    return _read_weights(Path(directory), allow_pickle)


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's on-disk keys (detached CPU copies). A PiSSA/OLoRA adapter comes
    converted for the original base (rank 2r: tailor.lora.initialisation), as `save_adapter` writes it."""
    configs = lora_configs(model)
    if name not in configs:
        raise ValueError(f"The model has no adapter {name!r}; it has {sorted(configs)}.")
    state: dict[str, torch.Tensor] = {}
    saved = _parameter_paths(model, configs[name])
    for key, layer in lora_layers(model).items():
        if name in layer.adapter_names:
            if isinstance(layer, LoraParam):  # under PEFT's nesting for this adapter's parameters
                key = saved[f"{strip_base_layer(key)}.{layer.parameter_name}"]
            tensors = adapter_tensors(layer, name)
            if name in layer.initial_tensors:
                tensors = on_original_base(tensors, layer.initial_tensors[name])
            for suffix, tensor in tensors.items():
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


def _parameter_paths(model: nn.Module, config: LoraConfig) -> dict[str, str]:
    """{parameter key: the module path its tensors are saved under} (PEFT nests one wrapper per adapted
    parameter of a module; the path depends on this adapter's target_parameters only, not on the wrappers
    other adapters or serving slots put into the model)."""
    if not config.target_parameters:
        return {}
    return {param: path for path, param in saved_paths(model, config.target_parameters).items()}


# ---------------------------------------------------------------------------------------------- save
def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                 metadata: dict[str, Any] | None = None) -> Path:
    """Write adapter `name` in PEFT's format, atomically, with tailor's metadata beside it
    (tailor_metadata.json: base fingerprint, precision, creation time, plus the `metadata` fields given;
    tailor.adapters.metadata).

    Files are written into a temporary directory next to `directory`, which is then renamed into place
    (tailor.files.atomic_output); an existing adapter directory is swapped out as a whole. If `directory`
    holds other files too, each adapter file is replaced atomically on its own. A crash never leaves a
    half-written adapter.
    """
    directory = Path(directory)
    state = adapter_state_dict(model, name)
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:  # such a file could not be loaded back (load_adapter refuses it): keep what is there instead
        raise AdapterFormatError(
            f"Adapter {name!r} was not saved to {directory}: tensor {broken[0]!r} holds NaN or infinity "
            f"({len(broken)} tensor(s) in all); training diverged. Whatever was at {directory} is left as "
            "it is. Retrain with a lower learning rate, or save an earlier checkpoint."
        )
    config = lora_configs(model)[name]
    metadata = dict(metadata or {})
    if changes_base(config.init_lora_weights):  # the base holds W - s B0 A0: saved for the original W
        config = on_original_base_config(config)
        metadata["conversion"] = conversion_record(lora_configs(model)[name], config)
    config_text = json.dumps(config_to_peft_dict(config), indent=2, sort_keys=True) + "\n"
    meta_text = metadata_text(new_metadata(model, **metadata))
    if directory.exists() and not directory.is_dir():
        raise AdapterFormatError(f"{str(directory)!r} exists and is a file, not a directory; the adapter was "
                                 "not saved and the file is left as it is. Choose another path.")
    if directory.is_dir() and not {p.name for p in directory.iterdir()} <= set(ADAPTER_FILES):
        # Shared directory (e.g. a run folder): replace the weights, then the config, each atomically;
        # then drop pickled weights of an older save, which the new safetensors file supersedes.
        with atomic_output(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        atomic_write_text(directory / CONFIG_NAME, config_text)
        atomic_write_text(directory / METADATA_NAME, meta_text)
        (directory / PICKLE_WEIGHTS_NAME).unlink(missing_ok=True)
        return directory
    with atomic_output(directory, directory=True) as tmp:  # none there, or only an old adapter: swap whole
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(config_text, encoding="utf-8")
        (tmp / METADATA_NAME).write_text(meta_text, encoding="utf-8")
    return directory


def conversion_record(trained: LoraConfig, saved: LoraConfig) -> dict[str, Any]:
    """What the save of a PiSSA/OLoRA adapter changed (tailor_metadata.json's `conversion`; report.md)."""
    return {"init_lora_weights": trained.init_lora_weights, "r": [trained.r, saved.r],
            "lora_alpha": [trained.lora_alpha, saved.lora_alpha],
            "note": "trained on the residual base W - s B0 A0; saved as the LoRA [B | -B0] [A ; A0] of "
                    "rank 2r on the original base (PEFT's path_initial_model_for_weight_conversion)"}


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
        for suffix, shape in adapter_shapes(module, r, plan.config.use_dora).items():
            expected[f"{key}.{suffix}"] = shape
    saved = _parameter_paths(model, plan.config)
    for path, param_name, r, _ in plan.parameters:
        for suffix, shape in parameter_shapes(model, path, param_name, r).items():
            expected[f"{saved[f'{path}.{param_name}']}.{suffix}"] = shape
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
    force: bool = False,
) -> str:
    """Add the adapter saved in `directory` (tailor or PEFT) to `model` as `name`; it becomes active.

    All or nothing: config, files and every tensor shape are checked before the model is touched; so is
    the base, when the adapter carries tailor's metadata: another base model than it was trained on is
    an error unless `force=True`, another dtype a warning (AdapterDtypeWarning).
    Returns the adapter name ("default" unless given).

    Raises:
        AdapterFormatError: missing/corrupt files, unknown peft_type, unsupported features, pickled
            weights without ``allow_pickle=True``.
        AdapterShapeError: the tensors do not fit the model (first module and both shapes named).
        LoraTargetError: the adapter's target modules do not exist in the model.
        AdapterBaseMismatchError: the model is not the base the adapter was trained on (see `force`).
        AdapterMetadataError: tailor_metadata.json is unreadable (ignored with a warning when forced).
    """
    directory = Path(directory)
    name = "default" if name is None else name
    if name in lora_configs(model):
        raise ValueError(f"The model already has an adapter named {name!r}; pass another name=.")
    config = _read_config(directory)
    raw = _read_weights(directory, allow_pickle)
    weights = {k.removeprefix(PREFIX): v for k, v in raw.items()}
    _, extras = _check_fit(model, config, weights, str(directory))
    _check_metadata(model, directory, force)
    add_lora(model, config, name)
    try:
        _copy_weights(model, name, weights, extras)
    except Exception:
        delete_adapter(model, name)
        raise
    return name


def _check_metadata(model: nn.Module, directory: Path, force: bool) -> None:
    try:
        metadata = read_metadata(directory)
    except AdapterMetadataError as error:
        if not force:
            raise
        warnings.warn(f"{error} Loaded without the base check (forced).", UserWarning, stacklevel=3)
        return
    check_base(model, metadata, str(directory), force)


@torch.no_grad()
def _copy_weights(model: nn.Module, name: str, weights: dict[str, torch.Tensor], extras: dict) -> None:
    saved = _parameter_paths(model, lora_configs(model)[name])
    for key, layer in lora_layers(model).items():
        if isinstance(layer, LoraParam) and name in layer.adapter_names:
            key = saved[f"{strip_base_layer(key)}.{layer.parameter_name}"]
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
