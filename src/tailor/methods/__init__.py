"""Training methods: one object per way of adapting a model, chosen once from the config by name.

`METHOD_SPECS` is the one registry of methods: the names that train, plan, advise and the command line
share, what each needs known without loading torch, and where its implementation lives. This module is
light on purpose (no torch import): the config, the planner and the CLI read the names and facts here; the
method objects, which prepare models and save deliverables, are imported only by `get_method`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tailor.methods.base import TrainingMethod


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of tailor needs to know about a training method without loading torch."""

    name: str
    summary: str
    trains_all_weights: bool  # full fine-tuning: every weight is trainable
    quantized_bits: int | None  # bits per frozen block-linear weight (None: not quantized)
    default_lr: float  # AdamW peak learning rate when the config gives none
    deliverable: str  # the run directory's subfolder holding the result: adapter/ or model/
    implementation: str  # "module:Class" of the TrainingMethod, imported only when used (torch, bnb)


METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("lora", "low-rank adapter on a frozen base (fp32 adapter)", False, None, 2e-4,
                   "adapter", "tailor.methods.lora:LoraMethod"),
        MethodSpec("full", "every weight trainable (fp32 master weights)", True, None, 2e-5,
                   "model", "tailor.methods.full:FullMethod"),
        MethodSpec("qlora-nf4", "low-rank adapter on a 4-bit NF4 frozen base (bitsandbytes)", False, 4, 2e-4,
                   "adapter", "tailor.methods.qlora:QLoraMethod"),
        MethodSpec("qlora-int8", "low-rank adapter on an 8-bit frozen base (bitsandbytes)", False, 8, 2e-4,
                   "adapter", "tailor.methods.qlora:QLoraMethod"),
    )
}
METHODS: tuple[str, ...] = tuple(METHOD_SPECS)
ADAPTER_METHODS: tuple[str, ...] = tuple(n for n, s in METHOD_SPECS.items() if not s.trains_all_weights)


def method_spec(name: str) -> MethodSpec:
    """The spec of method `name`; a ValueError listing the valid names otherwise."""
    try:
        return METHOD_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def get_method(name: str) -> TrainingMethod:
    """The TrainingMethod object for `name` (imports torch and the method's own dependencies)."""
    spec = method_spec(name)
    module_name, class_name = spec.implementation.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(spec)


__all__ = ["ADAPTER_METHODS", "METHODS", "METHOD_SPECS", "MethodSpec", "get_method", "method_spec"]
