"""Put LoRA adapters into a model: target matching (PEFT's rules), named adapters, activation, freezing."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from . import experts
from .config import ALL_LINEAR, LoraConfig
from .initialisation import changes_base
from .layer import LoraEmbedding, LoraLayer, LoraLinear, is_conv1d, wrap_layer
from .modules_to_save import ModulesToSaveWrapper

CONFIGS_ATTR = "tailor_lora_configs"  # {adapter name: resolved LoraConfig}, kept on the model
CLASSIFIER_HEAD_NAMES = ("classifier", "score")  # PEFT's SEQ_CLS_HEAD_NAMES

# PEFT's defaults when target_modules is None (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, excerpt).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"], "gpt2": ["c_attn"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "opt": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"], "t5": ["q", "v"],
}


class LoraTargetError(ValueError):
    """The config's targets do not fit the model; the message lists what the model has."""


@dataclass
class LoraPlan:
    """What add_lora will do: the resolved config, (path, module, r, alpha) targets, modules to save, and
    (module path, parameter name, r, alpha) for the parameters adapted directly (target_parameters)."""

    config: LoraConfig
    targets: list[tuple[str, nn.Module, int, float]]
    modules_to_save: list[tuple[str, nn.Module]]
    parameters: list[tuple[str, str, int, float]] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------------- matching
def _internal_prefixes(model: nn.Module) -> list[str]:
    """Paths of LoRA layers / wrappers: modules below them are adapter internals, never targets."""
    return [f"{k}." for k, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]


def _candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    internal = _internal_prefixes(model)
    return [(k, m) for k, m in model.named_modules() if k and not any(k.startswith(p) for p in internal)]


def _suffix_match(key: str, names: list[str]) -> bool:
    return any(key == n or key.endswith(f".{n}") for n in names)


def _layer_index_ok(config: LoraConfig, key: str) -> bool:
    """PEFT's layers_to_transform rule: the first numbered segment (after layers_pattern, if given)."""
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    patterns = config.layers_pattern
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == wanted if isinstance(wanted, int) else index in wanted


def _excluded(config: LoraConfig, key: str) -> bool:
    exclude = config.exclude_modules
    if isinstance(exclude, str) and re.fullmatch(exclude, key):
        return True
    if isinstance(exclude, list) and _suffix_match(key, exclude):
        return True
    # Never put LoRA inside a module that is trained whole (PEFT's rule).
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save or [])


def target_matches(config: LoraConfig, key: str) -> bool:
    """Whether module path `key` gets an adapter under `config` (resolved: no "all-linear" / None)."""
    if _excluded(config, key):
        return False
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:  # an exact path bypasses the layer filter, as in PEFT
        return True
    return _suffix_match(key, targets) and _layer_index_ok(config, key)


def pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: first pattern p with re.match(f"(.*\\.)?({p})$", key)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LoraLinear)) or is_conv1d(module)


def _output_head_names(model: nn.Module) -> set[str]:
    heads = []
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        heads.append(output)
    else:  # classifier models: the task head, as PEFT does for SEQ_CLS
        heads += [m for n in CLASSIFIER_HEAD_NAMES if isinstance(m := getattr(model, n, None), nn.Module)]
    return {k for k, m in model.named_modules() if any(m is h for h in heads)}


def _describe_layers(model: nn.Module) -> str:
    linear, embedding, example = set(), set(), {}
    for key, module in _candidate_modules(model):
        leaf = key.rsplit(".", 1)[-1]
        if _is_linear(module):
            linear.add(leaf)
            example.setdefault(leaf, key)
        elif isinstance(module, (nn.Embedding, LoraEmbedding)):
            embedding.add(leaf)
    text = f"Its linear layers are: {', '.join(sorted(linear)) or '(none)'}"
    if linear:
        first = sorted(linear)[0]
        text += f" (e.g. {example[first]})"
    if embedding:
        text += f"; embeddings: {', '.join(sorted(embedding))}"
    return text + ". Use these names, a regex over full module paths, or target_modules='all-linear'."


def _resolve_config(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """Turn None / "all-linear" into explicit targets and add PEFT's SEQ_CLS head to modules_to_save.

    "all-linear" is written as PEFT writes it: the short names of the adapted layers (``q_proj``, ...), or
    their full paths where the short names would also match layers that are not adapted; on an MoE model
    also PEFT's target_parameters for the experts and the router (tailor.lora.experts.moe_all_linear).
    """
    targets = config.target_modules
    params, patterns = config.target_parameters, {}
    modules_to_save = list(config.modules_to_save) if config.modules_to_save else None
    if config.task_type == "SEQ_CLS":
        modules_to_save = modules_to_save or []
        modules_to_save += [n for n in CLASSIFIER_HEAD_NAMES if n not in modules_to_save]
    if targets is None and params:
        targets = []  # PEFT: only the parameters are adapted
    elif targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise LoraTargetError(
                f"target_modules is None and there is no default for model type {model_type!r}. "
                + _describe_layers(model)
            )
        targets = list(DEFAULT_TARGETS[model_type])
    elif targets == ALL_LINEAR:
        heads = _output_head_names(model)
        probe = dataclasses.replace(config, target_modules=[], modules_to_save=modules_to_save)
        # Resolve to full paths (what PEFT saves); apply the layer filter here because exact paths bypass it.
        paths = sorted(
            k for k, m in _candidate_modules(model)
            if _is_linear(m) and k not in heads and not _excluded(probe, k) and _layer_index_ok(config, k)
        )
        targets = _short_names(model, dataclasses.replace(probe, modules_to_save=modules_to_save), paths)
        moe, factors = experts.moe_all_linear(model, paths)
        if moe and config.use_dora:
            raise LoraTargetError(
                f"use_dora cannot adapt the mixture-of-experts parameters of {type(model).__name__} "
                f"({moe[:2]} ...: target_modules 'all-linear' includes them on an MoE model; PEFT refuses "
                "DoRA there too). List the layers to adapt in target_modules (e.g. q_proj,k_proj,v_proj,"
                "o_proj), or set use_dora false."
            )
        if moe:
            if config.layers_to_transform is not None:  # PEFT matches parameters without a layer filter
                moe = [f"{p}.{n}" for p, n in experts.target_parameter_keys(model, moe)
                       if _layer_index_ok(config, f"{p}.{n}")]
            params = sorted(set(params or []) | set(moe))
            for name, factor in factors.items():  # PEFT: the fused pair keeps alpha / r of each v4 half
                patterns[rf".*\.{name}"] = factor
    rank_pattern = {**config.rank_pattern, **{k: config.r * f for k, f in patterns.items()}}
    alpha_pattern = {**config.alpha_pattern, **{k: config.lora_alpha * f for k, f in patterns.items()}}
    return dataclasses.replace(config, target_modules=targets, modules_to_save=modules_to_save,
                               target_parameters=params, rank_pattern=rank_pattern,
                               alpha_pattern=alpha_pattern)


def _short_names(model: nn.Module, config: LoraConfig, paths: list[str]) -> list[str]:
    """The layers' short names (PEFT's form) if they select exactly `paths` under `config`'s layer filter
    and exclusions; otherwise the full paths."""
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    probe = dataclasses.replace(config, target_modules=names)
    selected = [k for k, _ in _candidate_modules(model) if target_matches(probe, k)]
    return names if sorted(selected) == paths else paths


def plan_lora(model: nn.Module, config: LoraConfig) -> LoraPlan:
    """Resolve and check the config against the model without changing the model.

    Raises:
        LoraTargetError: a target name matches no module (listing the model's linear layer names), a
            matched module has an unsupported type, nothing is targeted, or no modules_to_save name exists.
    """
    requested_saves = config.modules_to_save  # SEQ_CLS heads added by resolution may legitimately be absent
    config = _resolve_config(model, config)
    candidates = _candidate_modules(model)
    keys = [k for k, _ in candidates]
    if isinstance(config.target_modules, list):
        missing = [t for t in config.target_modules if not _suffix_match_any(keys, t)]
        if missing:
            raise LoraTargetError(
                f"target_modules {missing} match no module of {type(model).__name__}. "
                + _describe_layers(model)
            )
    parameters = _plan_parameters(model, config)
    targets, unsupported = [], []
    for key, module in candidates:
        if not target_matches(config, key):
            continue
        if isinstance(module, experts.LoraParam) or (
                not isinstance(module, (nn.Linear, nn.Embedding, LoraLayer)) and not is_conv1d(module)):
            unsupported.append(f"{key} ({type(module).__name__})")
            continue
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
        targets.append((key, module, r, alpha))
    if unsupported:
        raise LoraTargetError(
            f"target_modules {config.target_modules!r} match modules LoRA cannot wrap: {unsupported[:5]}. "
            "Supported are nn.Linear, GPT-2 Conv1D and nn.Embedding. " + _describe_layers(model)
        )
    if not targets and not parameters:
        raise LoraTargetError(
            f"No module was targeted (target_modules={config.target_modules!r}, "
            f"exclude_modules={config.exclude_modules!r}, "
            f"layers_to_transform={config.layers_to_transform!r}, "
            f"modules_to_save={config.modules_to_save!r}). " + _describe_layers(model)
        )
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, field_name)
        keys = [t[0] for t in targets] + [f"{p}.{n}" for p, n, _, _ in parameters]
        unused = [p for p in patterns if all(pattern_value({p: 1}, k, None) is None for k in keys)]
        if unused:
            warnings.warn(f"{field_name} keys {unused} match no targeted module; ignored.", stacklevel=3)
    saves: list[tuple[str, nn.Module]] = []
    for key, module in candidates:
        nested = any(key.startswith(f"{k}.") for k, _ in saves)
        if _suffix_match(key, config.modules_to_save or []) and not nested:
            saves.append((key, module))
    if requested_saves and not saves:
        raise LoraTargetError(
            f"modules_to_save {requested_saves} match no module of {type(model).__name__}; "
            f"top-level modules are: {[k for k, _ in model.named_children()]}."
        )
    if any(is_conv1d(m.base_layer if isinstance(m, LoraLayer) else m) for _, m, _, _ in targets):
        config = dataclasses.replace(config, fan_in_fan_out=True)  # PEFT records this for Conv1D models
    return LoraPlan(config=config, targets=targets, modules_to_save=saves, parameters=parameters)


def _plan_parameters(model: nn.Module, config: LoraConfig) -> list[tuple[str, str, int, float]]:
    """(module path, parameter name, r, alpha) of the parameters config.target_parameters names.

    Raises:
        LoraTargetError: a name matches nothing, or the parameter's module is also a module target.
    """
    names = config.target_parameters or []
    if not names:
        return []
    found = experts.target_parameter_keys(model, names)
    missing = [n for n in names if not any(experts.parameter_matches([n], f"{p}.{k}") for p, k in found)]
    if missing:
        example = next((f"{k}.{n}" for k, m in model.named_modules()
                        if not isinstance(m, (nn.Linear, LoraLayer))
                        for n, p in m.named_parameters(recurse=False) if p.dim() == 3), None)
        raise LoraTargetError(f"target_parameters {missing} match no parameter of {type(model).__name__}"
                              + (f" (e.g. {example!r})." if example
                                 else "; it has no 3-D expert parameters."))
    clash = sorted({p for p, _ in found if target_matches(config, p)})
    if clash:
        raise LoraTargetError(f"{clash[:3]} are targeted both as modules (target_modules) and through their "
                              "parameters (target_parameters); PEFT refuses this too: name them once.")
    planned = []
    for path, name in found:
        key = f"{path}.{name}"
        r = pattern_value(config.rank_pattern, key, config.r)
        planned.append((path, name, r, pattern_value(config.alpha_pattern, key, config.lora_alpha)))
    return planned


def _suffix_match_any(keys: list[str], name: str) -> bool:
    return any(k == name or k.endswith(f".{name}") for k in keys)


# ---------------------------------------------------------------------------------------------- adapters
def lora_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """{adapter name: resolved LoraConfig} of the adapters on `model` (empty dict if none)."""
    return model.__dict__.setdefault(CONFIGS_ATTR, {})


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """{module path: LoRA layer} for every LoRA layer in the model, in module order."""
    return {k: m for k, m in model.named_modules() if isinstance(m, LoraLayer)}


def _wrappers(model: nn.Module) -> dict[str, ModulesToSaveWrapper]:
    return {k: m for k, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def add_lora(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Add adapter `name` to the modules `config` targets, in place; it becomes the (only) active adapter.

    Every base parameter is frozen (requires_grad=False); adapter weights are fp32 on the base layer's
    device. Returns `model`.

    Raises:
        LoraTargetError: see `plan_lora`; ValueError: bad or duplicate adapter name.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a tailor LoraConfig, got {type(config).__name__}.")
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"Adapter name {name!r} must be a non-empty string without '.'.")
    configs = lora_configs(model)
    if name in configs:
        raise ValueError(f"The model already has an adapter named {name!r}; pick another name or delete it.")
    if any(layer.merged_adapters for layer in lora_layers(model).values()):
        raise ValueError("Adapters are merged into the weights; call unmerge_lora(model) before adding one.")
    plan = plan_lora(model, config)
    init = plan.config.init_lora_weights
    if changes_base(init):  # every layer checked before the first base weight changes
        for key, module, r, _ in plan.targets:
            layer = module if isinstance(module, LoraLayer) else wrap_layer(module)
            if isinstance(layer, LoraLinear):
                try:
                    layer.check_base_changing_init(r)
                except ValueError as error:
                    raise ValueError(f"{key}: {error} Nothing was changed.") from None
    try:
        for key, module, r, alpha in plan.targets:
            layer = module if isinstance(module, LoraLayer) else wrap_layer(module)
            layer.add_adapter(name, r, alpha, plan.config.lora_dropout, plan.config.use_rslora, init,
                              use_dora=plan.config.use_dora)
            if layer is not module:
                _replace_module(model, key, layer)
        for path, param_name, r, alpha in plan.parameters:
            layer = experts.wrap_parameter(model, path, param_name)
            layer.add_adapter(name, r, alpha, 0.0, plan.config.use_rslora, init)
        for key, module in plan.modules_to_save:
            wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
            wrapper.add_adapter(name)
            if wrapper is not module:
                _replace_module(model, key, wrapper)
    except Exception:
        _remove_adapter(model, name)
        raise
    configs[name] = plan.config
    set_active_adapters(model, name)
    return model


def set_active_adapters(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the active adapters (several are summed: stacking); only they are trainable.

    Also freezes every base parameter, then unfreezes biases as the active configs' `bias` asks.

    Raises:
        ValueError: unknown adapter name, or two active adapters both having a copy of one module_to_save.
    """
    names = [names] if isinstance(names, str) else list(names)
    configs = lora_configs(model)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"Unknown adapter(s) {unknown}; the model has {sorted(configs)}.")
    merged = sorted({n for layer in lora_layers(model).values() for n in layer.merged_adapters} - set(names))
    if merged:
        raise ValueError(f"Adapters {merged} are merged into the weights; call unmerge_lora(model) first.")
    for path, wrapper in _wrappers(model).items():
        owners = [n for n in names if n in wrapper.modules_to_save]
        if len(owners) > 1:
            raise ValueError(f"Adapters {owners} each have a copy of {path!r}; only one can be active.")
    adapter_params = set()
    for layer in list(lora_layers(model).values()) + list(_wrappers(model).values()):
        layer.active_adapters = [n for n in names if n in layer.adapter_names]
        for adapter in layer.adapter_names:
            for p in layer.adapter_parameters(adapter):
                p.requires_grad_(adapter in names)
                adapter_params.add(id(p))
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)
    biases = {configs[n].bias for n in names}
    for key, p in model.named_parameters():
        if id(p) in adapter_params or not (key == "bias" or key.endswith(".bias")):
            continue
        if "all" in biases or ("lora_only" in biases and key.endswith(".base_layer.bias")):
            p.requires_grad_(True)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters active somewhere in the model, in adapter order."""
    active = {n for layer in lora_layers(model).values() for n in layer.active_adapters}
    return [n for n in lora_configs(model) if n in active]


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes exactly its base output (adapters skipped, not subtracted).

    Raises:
        ValueError: if an adapter is merged into the weights (call unmerge_lora first).
    """
    layers = list(lora_layers(model).values()) + list(_wrappers(model).values())
    merged = [k for k, m in lora_layers(model).items() if m.merged_adapters]
    if merged:
        raise ValueError(f"Adapters are merged into {merged[:3]}; call unmerge_lora(model) before disabling.")
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, flag in zip(layers, before, strict=True):
            m.disabled = flag


def _remove_adapter(model: nn.Module, name: str) -> None:
    """Drop adapter `name` from every layer; layers left without adapters go back to their base module."""
    for key, layer in lora_layers(model).items():
        if name in layer.adapter_names:
            layer.delete_adapter(name)
        if isinstance(layer, experts.LoraParam):  # taken out below, innermost first
            continue
        if not layer.adapter_names and layer.unwrap_when_empty:  # a layer with adapter slots stays wrapped
            _replace_module(model, key, layer.base_layer)
    experts.unwrap_empty(model)
    for key, wrapper in _wrappers(model).items():
        if name in wrapper.adapter_names:
            wrapper.delete_adapter(name)
        if not wrapper.adapter_names:
            _replace_module(model, key, wrapper.original_module)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; the remaining active adapters stay active.

    Raises:
        ValueError: unknown name, or the adapter is merged (unmerge first).
    """
    configs = lora_configs(model)
    if name not in configs:
        raise ValueError(f"Unknown adapter {name!r}; the model has {sorted(configs)}.")
    if any(name in layer.merged_adapters for layer in lora_layers(model).values()):
        raise ValueError(f"Adapter {name!r} is merged into the weights; call unmerge_lora(model) first.")
    still_active = [n for n in active_adapters(model) if n != name]
    _remove_adapter(model, name)
    del configs[name]
    if still_active:
        set_active_adapters(model, still_active)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared ones once (as PEFT's get_nb_trainable_parameters)."""
    trainable = total = 0
    for p in model.parameters():
        # A packed quantized weight (bitsandbytes 4-bit: two values per byte) counts the elements of the
        # weight it stands for, from its quant state's shape (PEFT doubles Params4bit's numel: the same).
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        n = math.prod(shape) if shape is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
