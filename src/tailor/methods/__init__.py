"""Training methods: one object per way of adapting a model, chosen once from the config by name.

The registry of methods (`METHOD_SPECS`: names, facts, where each implementation lives) is
tailor.method_specs, below the config that chooses from it; it is handed on here. This module is light on
purpose (no torch import); the method objects, which prepare models and save deliverables, are imported
only by `get_method`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tailor.method_specs import ADAPTER_METHODS, METHOD_SPECS, METHODS, MethodSpec, method_spec

if TYPE_CHECKING:
    from tailor.methods.base import TrainingMethod


def get_method(name: str) -> TrainingMethod:
    """The TrainingMethod object for `name` (imports torch and the method's own dependencies)."""
    spec = method_spec(name)
    module_name, class_name = spec.implementation.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(spec)


__all__ = ["ADAPTER_METHODS", "METHODS", "METHOD_SPECS", "MethodSpec", "get_method", "method_spec"]
