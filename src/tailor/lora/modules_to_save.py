"""Whole-module copies trained per adapter (e.g. a classifier head), PEFT's `modules_to_save`."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModulesToSaveWrapper(nn.Module):
    """Keeps the frozen ``original_module`` and one trainable copy per adapter name.

    Forward runs the copy of the first active adapter that has one, else the original. The state-dict
    layout (``original_module.*``, ``modules_to_save.<name>.*``) is PEFT's, so on disk the copy is saved
    under the wrapped module's own path (``classifier.weight``).
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self._current(), name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise ValueError(f"modules_to_save wrapper already has an adapter named {name!r}.")
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters())

    def _current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self._current()(*args, **kwargs)
