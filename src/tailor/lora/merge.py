"""Fold adapters into the base weights (merge), take them out (unmerge), or drop the wrappers (unload)."""

from __future__ import annotations

import torch
from torch import nn

from .experts import LoraParam
from .inject import _replace_module, _wrappers, lora_configs, lora_layers
from .layer import LoraLayer, LoraLinear


class UnsafeMergeError(ValueError):
    """A safe merge found non-finite values; nothing was changed."""


def _weight(layer: LoraLayer) -> torch.Tensor:
    """The tensor the adapter updates: the base layer's weight, or the adapted parameter (LoraParam)."""
    return layer.get_param() if isinstance(layer, LoraParam) else layer.base_layer.weight


def _merged_weight(layer: LoraLayer, name: str) -> torch.Tensor:
    """W + delta computed in fp32 (also for bf16/fp16 bases), cast back to W's dtype."""
    weight = _weight(layer)
    return (weight.float() + layer.delta_weight(name).to(weight.device)).to(weight.dtype)


def _to_merge(layer: LoraLayer, adapter_names: list[str] | None) -> list[str]:
    names = layer.active_adapters if adapter_names is None else adapter_names
    return [n for n in names if n in layer.adapter_names and n not in layer.merged_adapters]


@torch.no_grad()
def merge_lora(model: nn.Module, safe: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
    """Add ``B A * scaling`` of the active (or given) adapters into each base weight, in fp32.

    The layers then skip those adapters' branch, so outputs stay the same up to rounding.
    With ``safe=True`` every merged weight is checked first and nothing changes if any value is
    NaN/inf.

    Raises:
        UnsafeMergeError: safe merge found non-finite values (model untouched).
        ValueError: a base weight is not a float tensor (a quantized layer; model untouched).
    """
    layers = lora_layers(model)
    for key, layer in layers.items():
        weight = _weight(layer)
        if _to_merge(layer, adapter_names) and not weight.is_floating_point():
            raise ValueError(
                f"Cannot merge into {key!r}: its base weight is stored as {weight.dtype} "
                f"({type(layer.base_layer).__name__}, a quantized layer). Dequantize the base first (for "
                "bitsandbytes layers: tailor.quant.dequantize_model), then merge. Nothing was merged."
            )
    if safe:
        for key, layer in layers.items():
            for name in _to_merge(layer, adapter_names):
                if not torch.isfinite(_merged_weight(layer, name)).all():
                    raise UnsafeMergeError(
                        f"Merging adapter {name!r} into {key!r} gives NaN/inf weights; the adapter looks "
                        "broken (diverged training?). Nothing was merged."
                    )
    for layer in layers.values():
        for name in _to_merge(layer, adapter_names):
            _weight(layer).data = _merged_weight(layer, name)
            layer.merged_adapters.append(name)
    return model


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter again, last merged first (fp32 arithmetic)."""
    for layer in lora_layers(model).values():
        weight = _weight(layer)
        while layer.merged_adapters:
            name = layer.merged_adapters.pop()
            weight.data = (weight.float() - layer.delta_weight(name).to(weight.device)).to(weight.dtype)
    return model


def unload_lora(model: nn.Module, merge: bool = True, safe: bool = False) -> nn.Module:
    """Merge the active adapters (unless ``merge=False``) and remove every LoRA wrapper.

    Each modules_to_save wrapper is replaced by the active adapter's trained copy (or the original if no
    active adapter has one). Returns the plain transformers model.
    """
    if merge:
        merge_lora(model, safe=safe)
    # innermost first: nested wrappers (several parameters of one module) keep valid paths
    for key, layer in reversed(lora_layers(model).items()):
        if isinstance(layer, LoraLinear):  # an unmerged PiSSA/OLoRA adapter gives back what it took
            for name in list(layer.initial_tensors):
                layer.give_back_to_base(name)
        _replace_module(model, key, layer.base_layer)
    for key, wrapper in _wrappers(model).items():
        _replace_module(model, key, wrapper._current() if merge else wrapper.original_module)
    lora_configs(model).clear()
    return model
