"""Fold adapters into the base weights (merge), take them out (unmerge), or drop the wrappers (unload).

A plain adapter adds ``s B A``; a DoRA adapter replaces W by ``m / ||W + s B A|| * (W + s B A)`` (per output
row, the norm of the weight before any adapter is merged, as its forward computes it; PEFT's merge).
"""

from __future__ import annotations

import torch
from torch import nn

from . import dora
from .experts import LoraParam
from .inject import _replace_module, _wrappers, lora_configs, lora_layers
from .layer import LoraEmbedding, LoraLayer, LoraLinear


class UnsafeMergeError(ValueError):
    """A safe merge found non-finite values; nothing was changed."""


def _weight(layer: LoraLayer) -> torch.Tensor:
    """The tensor the adapter updates: the base layer's weight, or the adapted parameter (LoraParam)."""
    return layer.get_param() if isinstance(layer, LoraParam) else layer.base_layer.weight


def _transposed(layer: LoraLayer) -> bool:
    """DoRA's rows are the stored weight's columns (Conv1D's (in, out) layout, embeddings)."""
    return isinstance(layer, LoraEmbedding) or bool(getattr(layer, "fan_in_fan_out", False))


def _merged_weights(layer: LoraLayer, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weight with adapters `names` merged in turn, computed in fp32 at least (also for bf16/fp16
    bases) and cast back to W's dtype, and the norms of the DoRA adapters among them (for unmerging)."""
    weight = _weight(layer)
    unmerged = weight.to(torch.promote_types(weight.dtype, torch.float32))  # the base W, DoRA's norm's W
    merged, norms = unmerged, {}
    for name in names:
        delta = layer.delta_weight(name).to(weight.device)
        if layer.uses_dora(name):
            magnitude = layer.lora_magnitude_vector[name]
            merged, norms[name] = dora.merged_weight(merged, unmerged, delta, magnitude, _transposed(layer))
        else:
            merged = merged + delta
    return merged.to(weight.dtype), norms


def _to_merge(layer: LoraLayer, adapter_names: list[str] | None) -> list[str]:
    names = layer.active_adapters if adapter_names is None else adapter_names
    return [n for n in names if n in layer.adapter_names and n not in layer.merged_adapters]


@torch.no_grad()
def merge_lora(model: nn.Module, safe: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
    """Add ``B A * scaling`` of the active (or given) adapters into each base weight, in fp32 (a DoRA
    adapter: ``W -> m / ||W + s B A|| * (W + s B A)``; DoRA adapters merge in one call, into unmerged
    weights).

    The layers then skip those adapters' branch, so outputs stay the same up to rounding.
    With ``safe=True`` every merged weight is checked first and nothing changes if any value is
    NaN/inf.

    Raises:
        UnsafeMergeError: safe merge found non-finite values (model untouched).
        ValueError: a base weight is not a float tensor (a quantized layer; model untouched), or a DoRA
            adapter would merge into a weight that holds merged adapters already (model untouched).
    """
    layers = lora_layers(model)
    for key, layer in layers.items():
        weight = _weight(layer)
        names = _to_merge(layer, adapter_names)
        if layer.merged_adapters and any(layer.uses_dora(n) for n in names):
            raise ValueError(
                f"Cannot merge DoRA adapter(s) {[n for n in names if layer.uses_dora(n)]} into {key!r}: "
                f"{layer.merged_adapters} are merged there already, and DoRA's norm needs the unmerged "
                "weight. Call unmerge_lora(model) first, then merge all adapters in one call. Nothing was "
                "merged."
            )
        if names and not weight.is_floating_point():
            raise ValueError(
                f"Cannot merge into {key!r}: its base weight is stored as {weight.dtype} "
                f"({type(layer.base_layer).__name__}, a quantized layer). Dequantize the base first (for "
                "bitsandbytes layers: tailor.quant.dequantize_model), then merge. Nothing was merged."
            )
    if safe:
        for key, layer in layers.items():
            names = _to_merge(layer, adapter_names)
            if names and not torch.isfinite(_merged_weights(layer, names)[0]).all():
                raise UnsafeMergeError(
                    f"Merging adapter(s) {names} into {key!r} gives NaN/inf weights; the adapter looks "
                    "broken (diverged training?). Nothing was merged."
                )
    for layer in layers.values():
        names = _to_merge(layer, adapter_names)
        if names:
            _weight(layer).data, norms = _merged_weights(layer, names)
            layer.merged_adapters += names
            layer.merged_norms.update(norms)
    return model


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter again, last merged first (fp32 arithmetic)."""
    for layer in lora_layers(model).values():
        weight = _weight(layer)
        if not layer.merged_adapters:
            continue
        current = weight.to(torch.promote_types(weight.dtype, torch.float32))
        while layer.merged_adapters:
            name = layer.merged_adapters.pop()
            delta = layer.delta_weight(name).to(weight.device)
            if name in layer.merged_norms:
                norm = layer.merged_norms.pop(name)
                current = dora.unmerged_weight(current, delta, layer.lora_magnitude_vector[name], norm,
                                               _transposed(layer))
            else:
                current = current - delta
        weight.data = current.to(weight.dtype)
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
