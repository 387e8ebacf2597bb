"""`model: "auto"`: the server picks the adapter by the request's content (tailor.routing).

The candidates are the served adapters whose `tailor_metadata.json` carries a routing description (all of
them for ``auto``; a named router's own list for ``--route NAME=auto:A,B,...``). The prompt is embedded
from the base model's token embeddings, the first step of the pass the engine makes anyway (an
embedding lookup: microseconds, no second model and no second prefill), and goes to the closest adapter,
or to the base model when its prompt is close to none (a low-confidence fallback, counted in /metrics).

Descriptions are read from disk once per adapter directory and file version (its modification time), so
an adapter described again while the server runs is routed by its new description. A description the
server cannot use (broken, of another base model or layer) leaves that adapter out of ``auto`` with a
logged warning, and makes a router naming it refuse to start (a 400 if it changes while serving).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from tailor.adapters.layout import METADATA_NAME
from tailor.adapters.metadata import (
    AdapterMetadataError,
    base_fingerprint,
    describe_base,
    read_metadata,
    same_base,
)
from tailor.routing import ROUTING_LAYER, ROUTING_MARGIN, Choice, Described, RoutingDescriptionError, choose
from tailor.routing.embed import base_embedding_table, content_tokens, template_frame
from tailor.serve.adapters import AdapterManager, AdapterRefusedError, UnknownAdapterError

AUTO = "auto"  # the model name that asks the server to choose


class NoDescribedAdapterError(LookupError):
    """`model: "auto"` (or a router) with no candidate adapter carrying a routing description (HTTP 400)."""


@dataclass(frozen=True)
class Routed:
    """Where an auto request went: `adapter` (None: the base model) and why (`choice`)."""

    router: str
    adapter: str | None
    choice: Choice

    @property
    def fallback(self) -> bool:
        """Sent to the base because no adapter was close enough."""
        return self.adapter is None


class ContentRouter:
    """Chooses among the manager's described adapters (any thread).

    Args:
        model: the served base model (its token embedding table embeds prompts).
        manager: the served adapters.
        margin: the largest score (distance / radius) still routed to an adapter.
    """

    def __init__(self, model: nn.Module, tokenizer, manager: AdapterManager | None,
                 margin: float = ROUTING_MARGIN) -> None:
        self.manager, self.margin = manager, margin
        self.frame = template_frame(tokenizer)  # left out of the pooling, as in the descriptions
        self.table = base_embedding_table(model)  # (V, H)
        self.base = base_fingerprint(model)  # a description of another base lives in another space
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[int, Described | None]] = {}  # directory -> (mtime_ns, description)
        self._warned: set[tuple[str, str]] = set()

    def embed(self, prompt_ids: list[int]) -> torch.Tensor:
        """(H,) float32: the prompt's token embeddings, mean-pooled (layer 0 of tailor.routing)."""
        ids = torch.tensor(content_tokens(prompt_ids, self.frame), device=self.table.device)
        with torch.inference_mode():
            return nn.functional.embedding(ids, self.table).float().mean(0).cpu()  # (T, H) -> (H,)

    def described(self, name: str) -> Described | None:
        """Adapter `name`'s description (None: it has none). Raises UnknownAdapterError,
        AdapterRefusedError, RoutingDescriptionError (a broken description)."""
        directory = self.manager.path(name)
        path = directory / METADATA_NAME
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:  # no metadata (a PEFT adapter), or removed just now
            stamp = -1
        with self._lock:
            cached = self._cache.get(directory)
        if cached is not None and cached[0] == stamp:
            return None if cached[1] is None else replace(cached[1], name=name)
        try:
            record = read_metadata(directory) or {}
        except AdapterMetadataError as error:
            raise RoutingDescriptionError(str(error)) from None
        description = record.get("routing")
        found = Described.of(name, description, str(path)) if description is not None else None
        if found is not None and found.layer != ROUTING_LAYER:
            raise RoutingDescriptionError(f"{path}: described at layer {found.layer}; this server embeds "
                                          f"prompts at layer {ROUTING_LAYER}; describe it again "
                                          "(tailor adapters describe NAME --examples FILE).")
        if found is not None and not same_base(description.get("base"), self.base):
            raise RoutingDescriptionError(
                f"{path}: described with base {describe_base(description.get('base'))}, but this server "
                f"serves {describe_base(self.base)}; describe it again with this base "
                "(tailor adapters describe NAME --examples FILE --model BASE).")
        with self._lock:
            self._cache[directory] = (stamp, found)
        return found

    def candidates(self, among: tuple[str, ...] | None) -> list[Described]:
        """The described adapters among `among` (None: every served adapter, each directory once)."""
        if self.manager is None:
            return []
        names = among if among is not None else _one_name_per_directory(self.manager)
        found = []
        for name in names:
            try:
                described = self.described(name)
            except (UnknownAdapterError, AdapterRefusedError, RoutingDescriptionError) as error:
                if among is None:  # unloaded meanwhile, or a description this server cannot use
                    if isinstance(error, RoutingDescriptionError):
                        self._warn_once(name, error)
                    continue
                raise
            if described is not None:
                found.append(described)
        return found

    def _warn_once(self, name: str, error: Exception) -> None:
        """Log a description `auto` leaves out, once per adapter and message."""
        key = (name, str(error))
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logging.getLogger("tailor.serve").warning("model 'auto' leaves out adapter %s: %s", name, error)

    def route(self, router: str, prompt_ids: list[int], among: tuple[str, ...] | None) -> Routed:
        """Where the prompt goes. Raises NoDescribedAdapterError when no candidate is described."""
        candidates = self.candidates(among)
        if not candidates:
            which = (f"adapters {', '.join(among)} of router {router!r}" if among
                     else "adapters of this server")
            raise NoDescribedAdapterError(
                f"model {router!r} routes by content, but none of the {which} carries a routing "
                "description; describe them (tailor adapters describe NAME --examples FILE; `tailor train` "
                "describes the adapters it trains) or name an adapter as the model.")
        choice = choose(self.embed(prompt_ids), candidates, self.margin)
        return Routed(router, choice.adapter, choice)


def _one_name_per_directory(manager: AdapterManager) -> list[str]:
    """Served names, one per adapter directory (a store lists NAME, NAME@VERSION and tags for one)."""
    seen: dict[Path, str] = {}
    for name in sorted(manager.names(), key=lambda n: ("@" in n, len(n), n)):
        try:
            directory = manager.path(name)
        except (UnknownAdapterError, AdapterRefusedError):
            continue
        seen.setdefault(directory, name)
    return sorted(seen.values())


__all__ = ["AUTO", "ContentRouter", "NoDescribedAdapterError", "Routed"]
