"""Training methods: one object per way of adapting a model, chosen once from the config by name.

`METHODS` is the one list of method names that train, plan, advise and the command line share (its table
lives in tailor.config, the vocabulary of a run, and is handed on here). This module is light on purpose
(no torch import): the planner and the CLI read the names and facts here; the method objects, which
prepare models and save deliverables, are imported only by `get_method`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tailor.config import ADAPTER_METHODS, METHOD_SPECS, METHODS, MethodSpec, method_spec

if TYPE_CHECKING:
    from tailor.methods.base import TrainingMethod


# The implementations, imported only when a method is used (torch, bitsandbytes).
_IMPLEMENTATIONS = {
    "lora": "tailor.methods.lora:LoraMethod",
    "full": "tailor.methods.full:FullMethod",
    "qlora-nf4": "tailor.methods.qlora:QLoraMethod",
    "qlora-int8": "tailor.methods.qlora:QLoraMethod",
}


def get_method(name: str) -> TrainingMethod:
    """The TrainingMethod object for `name` (imports torch and the method's own dependencies)."""
    spec = method_spec(name)
    module_name, class_name = _IMPLEMENTATIONS[spec.name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(spec)


__all__ = ["ADAPTER_METHODS", "METHODS", "METHOD_SPECS", "MethodSpec", "get_method", "method_spec"]
