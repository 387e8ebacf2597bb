"""Adapters by name for the engine: found under one root directory, read from disk on first use (in a
background thread), kept in host memory (least recently used out first), and put into the model's fixed
slots between engine steps.

Three tiers, as in LoRAX and vLLM: disk (every subdirectory of the root is an adapter named after it) ->
host memory (`max_cpu_loras` adapters, already converted to the slots' layout) -> slots (`max_loras`,
ranks padded to `max_lora_rank`; a slot whose adapter is used by a running request is never evicted).
A name is a name, never a path: anything that would resolve outside the root is refused. Names follow
the adapter store's rule (`tailor.adapters.store.parse_ref`: NAME, NAME@VERSION, NAME@TAG), one rule for
both.

A request resolves its adapter name once (`resolve`) into an `AdapterRef` (name, directory, generation)
that travels with it: the host cache, the background load and the slot all key on that reference, so a
store tag that moves or an adapter reloaded under the same name never mixes two versions in one request.

The engine uses the manager through the small interface `EngineAdapters`; the server and the admin API
use `resolve`, `ensure`, `load`, `unregister`, `names` and `path`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from tailor.adapters.format import (
    CONFIG_NAME,
    PREFIX,
    AdapterFormatError,
    read_adapter_config,
    read_adapter_weights,
)
from tailor.adapters.store import NAME_RE, AdapterStore, StoreError, parse_ref
from tailor.lora import LoraSlots, SlotError, add_lora_slots
from tailor.lora.layer import MAGNITUDE_KEY


class UnknownAdapterError(LookupError):
    """No adapter of that name (HTTP 404)."""


class AdapterRefusedError(ValueError):
    """An adapter name or files the server will not serve: a path, an escape from the root, unsupported
    LoRA features, a rank above max_lora_rank, shapes of another base (HTTP 400)."""


@dataclass(frozen=True)
class AdapterRef:
    """What an adapter name stood for when a request asked for it: resolved once, then carried along.

    `generation` counts the (re)loads and unloads of the name, so a reference taken before an adapter
    was reloaded from new files never matches the new weights (nor the new ones the old reference).
    """

    name: str
    directory: Path
    generation: int


@dataclass
class HostAdapter:
    """One adapter read from disk, in the slots' layout: {module path: (A^T, scaling * B^T)}, DoRA layers
    with g folded into B and g - 1 beside (tailor.lora.rows)."""

    name: str
    path: Path
    generation: int
    weights: dict[str, tuple[torch.Tensor, ...]]
    rank: int
    load_ms: float
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(t.nbytes for tensors in self.weights.values() for t in tensors)

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.name, self.path, self.generation)


class EngineAdapters(Protocol):
    """What the engine asks of per-row adapters (`AdapterManager` is the one implementation).

    The engine thread calls every method but `resolve`, `prefetch` and `close` (any thread).
    """

    max_cpu_loras: int  # adapters that may load at once; later requests wait their turn
    on_ready: Callable[[], None] | None  # called when a background load ends (wakes the engine)

    def resolve(self, name: str) -> AdapterRef: ...
    def prefetch(self, ref: AdapterRef) -> None: ...
    def failure(self, ref: AdapterRef) -> Exception | None: ...
    def acquire(self, ref: AdapterRef) -> int | None: ...
    def release(self, slot: int) -> None: ...
    def use_rows(self, slots: Sequence[int] | None) -> None: ...
    def idle(self) -> None: ...
    def close(self) -> None: ...


def read_for_slots(directory: Path, slots: LoraSlots) -> tuple[dict, int]:
    """An adapter directory's weights in the slots' layout (`LoraSlots.prepare`) and its largest rank.

    Raises:
        AdapterRefusedError: the adapter uses what slots cannot hold (modules_to_save, trained biases,
            embedding LoRA, modules without slots, rank above max_lora_rank, shapes of another base),
            or its files are missing or corrupt.
    """
    try:
        config = read_adapter_config(directory)
        raw = read_adapter_weights(directory)
    except AdapterFormatError as error:
        raise AdapterRefusedError(str(error)) from None
    problems = []
    if config.modules_to_save:
        problems.append(f"modules_to_save={config.modules_to_save}")
    if config.bias != "none":
        problems.append(f"bias={config.bias!r}")
    halves: dict[str, list] = {}
    magnitudes: dict[str, torch.Tensor] = {}  # DoRA's, per module path
    for key, tensor in raw.items():
        path = key.removeprefix(PREFIX)
        if config.use_dora and path.endswith(f".{MAGNITUDE_KEY}"):
            magnitudes[path.removesuffix(f".{MAGNITUDE_KEY}")] = tensor
            continue
        for index, suffix in enumerate((".lora_A.weight", ".lora_B.weight")):
            if path.endswith(suffix):
                halves.setdefault(path.removesuffix(suffix), [None, None])[index] = tensor
                break
        else:
            problems.append(f"tensor {key!r}")
    if problems:
        raise AdapterRefusedError(
            f"{directory}: the server serves LoRA on linear layers only; this adapter also has "
            f"{', '.join(problems[:3])}. Merge it into the model instead (tailor.lora.merge_lora).")
    incomplete = [path for path, (a, b) in halves.items() if a is None or b is None]
    if incomplete or not halves:
        raise AdapterRefusedError(f"{directory}: lora_A/lora_B pairs are incomplete for {incomplete[:3]} "
                                  "(or there are none); save the adapter again.")
    unscaled = sorted(set(halves) - set(magnitudes)) if config.use_dora else []
    if unscaled:
        raise AdapterRefusedError(f"{directory}: a DoRA adapter (use_dora) without lora_magnitude_vector for "
                                  f"{unscaled[:3]}; save the adapter again.")
    weights, rank = slots.adapter_weights(config, halves)  # MoE parameters: PEFT's paths -> their keys
    try:
        prepared = slots.prepare(weights, magnitudes)  # checked, transposed, scaled: a slot write copies
    except SlotError as error:
        raise AdapterRefusedError(f"{directory}: {error}") from None
    return prepared, rank


class AdapterManager:
    """Names -> directories -> host memory -> slots, for one model.

    Args:
        model: the base model; its linear layers (all but the output head) get `max_loras` slots.
        root: the adapter directory (each subdirectory an adapter), or None (adapters only by `register`).
        max_loras: slots, adapters computed in one batch at once.
        max_lora_rank: the largest rank a slot holds.
        max_cpu_loras: adapters kept in host memory (default: max_loras).
        dtype: the slots' dtype (default float32: PEFT's adapter precision; on a CPU without AMX, fp32
            batched matmuls of these thin shapes also run faster than bf16 ones).
        on_ready: called (from the loader thread) when an adapter finished loading.
    """

    def __init__(self, model: nn.Module, root: str | Path | None = None, max_loras: int = 8,
                 max_lora_rank: int = 16, max_cpu_loras: int | None = None,
                 dtype: torch.dtype = torch.float32, on_ready: Callable[[], None] | None = None) -> None:
        self.root = Path(root).resolve() if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise AdapterRefusedError(f"adapter directory {str(root)!r} does not exist or is not a "
                                      "directory; create it (each subdirectory is an adapter named after "
                                      "it).")
        self.slots = add_lora_slots(model, max_loras, max_lora_rank, dtype=dtype)
        self.max_cpu_loras = max(max_cpu_loras if max_cpu_loras is not None else max_loras, 1)
        self.on_ready = on_ready
        self._lock = threading.Lock()
        self._registered: dict[str, Path] = {}  # names given by `register` (the load endpoint, tests)
        self._unloaded: set[str] = set()  # root subdirectories unloaded through the API
        self._host: OrderedDict[AdapterRef, HostAdapter] = OrderedDict()  # least recently used first
        self._loading: dict[AdapterRef, Future] = {}
        self._failed: dict[AdapterRef, Exception] = {}
        self._generation: dict[str, int] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tailor-adapter-load")
        # slots: engine thread only
        self.owner: list[str | None] = [None] * max_loras
        self.keys: list[AdapterRef | None] = [None] * max_loras  # what each slot holds
        self.pins = [0] * max_loras
        self._slot_lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(max_loras))
        # resolves: names resolved for requests (`resolve`), one per request that names an adapter
        self.stats = {"loads": 0, "hits": 0, "misses": 0, "evictions": 0, "resolves": 0}
        self.listeners: list[Callable[[str, str, float], None]] = []  # (event, adapter, seconds)

    # --- names ---------------------------------------------------------------------------------------
    def check_name(self, name: str) -> None:
        """Refuse what is not an adapter name or reference (the store's rule; never a path)."""
        try:
            parse_ref(name)
        except StoreError as error:
            raise AdapterRefusedError(f"{error} Adapters live under the adapter root.") from None

    def resolve(self, name: str) -> AdapterRef:
        """What `name` stands for now, as the reference a request carries (`path` plus the generation).
        Call it once per request: everything after takes the reference.

        Raises:
            AdapterRefusedError, UnknownAdapterError: see `path`.
        """
        directory = self.path(name)
        with self._lock:
            self.stats["resolves"] += 1
            return AdapterRef(name, directory, self._generation.get(name, 0))

    def path(self, name: str) -> Path:
        """The directory adapter `name` stands for now: a subdirectory of the root, a store reference
        (NAME, NAME@VERSION, NAME@TAG) when the root is an adapter store (tailor.adapters.store), a
        reference into the default store when it has an '@', or a name given to `register`/`load`.
        For listing and checks; a request resolves its name with `resolve`.

        Raises:
            AdapterRefusedError: not a name, or it resolves outside the adapter root (a symlink out).
            UnknownAdapterError: there is no such adapter.
        """
        self.check_name(name)
        with self._lock:
            if name in self._registered:
                return self._registered[name]
            if name in self._unloaded:
                raise UnknownAdapterError(name)
        if self.root is not None:
            resolved = (self.root / name).resolve()
            if not resolved.is_relative_to(self.root):
                raise AdapterRefusedError(f"adapter {name!r} resolves outside the adapter root; refused.")
            if (resolved / CONFIG_NAME).is_file():
                return resolved
            found = _store_resolve(name, self.root)
            if found is not None:
                if not found.resolve().is_relative_to(self.root):
                    raise AdapterRefusedError(f"adapter {name!r} resolves outside the adapter root; refused.")
                return found
        if "@" in name:
            found = _store_resolve(name, None)
            if found is not None:
                return found
        raise UnknownAdapterError(name)

    def names(self) -> list[str]:
        """The adapters that can be served: subdirectories of the root holding an adapter, store names
        with their versions and tags when the root is a store, and the names given to `register`."""
        found = set()
        if self.root is not None:
            for child in self.root.iterdir():
                if NAME_RE.fullmatch(child.name) and (child / CONFIG_NAME).is_file():
                    try:
                        self.path(child.name)
                        found.add(child.name)
                    except (AdapterRefusedError, UnknownAdapterError):
                        pass
            found |= set(_store_refs(self.root))
        with self._lock:
            return sorted((found - self._unloaded) | set(self._registered))

    def register(self, name: str, path: str | Path | None = None) -> Path:
        """Make `name` servable: `path` relative to the root (default: the root's `name`), never outside."""
        self.check_name(name)
        if path is None:
            with self._lock:
                self._unloaded.discard(name)
            directory = self.path(name)
        else:
            directory = self._inside_root(path)
        with self._lock:
            self._registered[name] = directory
            self._unloaded.discard(name)
            self._forget(name)  # a (re)load reads the files again
        return directory

    def _forget(self, name: str) -> None:
        """A new generation of `name` (lock held): its copies in host memory and its failures go."""
        for ref in [ref for ref in self._host if ref.name == name]:
            del self._host[ref]
        for ref in [ref for ref in self._failed if ref.name == name]:
            del self._failed[ref]
        self._generation[name] = self._generation.get(name, 0) + 1

    def load(self, name: str, path: str | Path | None = None) -> HostAdapter:
        """Read and check an adapter, then serve it as `name` (the load endpoint): nothing changes if
        it is refused. `path` is relative to the root (default: the root's `name`), never outside."""
        self.check_name(name)
        if path is not None:
            directory = self._inside_root(path)
        else:
            with self._lock:
                directory = self._registered.get(name)
            if directory is None:
                directory = (_store_resolve(name) if "@" in name else None) or self._inside_root(name)
        started = time.perf_counter()
        weights, rank = read_for_slots(directory, self.slots)  # refused: nothing changed
        self.register(name, directory)
        adapter = HostAdapter(name, directory, self._generation[name], weights, rank,
                              (time.perf_counter() - started) * 1000)
        return self._keep(adapter)

    def _keep(self, adapter: HostAdapter) -> HostAdapter:
        """Hold a freshly read adapter in host memory, most recently used; count and announce the load."""
        with self._lock:
            self._host[adapter.ref] = adapter
            self._host.move_to_end(adapter.ref)
            while len(self._host) > self.max_cpu_loras:  # least recently used out (never the new one)
                self._host.popitem(last=False)
            self.stats["loads"] += 1
        self._notify("load", adapter.name, adapter.load_ms / 1000)
        return adapter

    def ensure(self, ref: AdapterRef) -> HostAdapter:
        """The adapter in host memory (waiting for a background load of it), or its error."""
        with self._lock:
            future = self._loading.get(ref)
        if future is not None:
            future.result()
            failure = self.failure(ref)
            if failure is not None:
                raise failure
        return self.read(ref)

    def _inside_root(self, path: str | Path) -> Path:
        if self.root is None:
            raise AdapterRefusedError("the server has no adapter root (--adapters); nothing can be loaded.")
        candidate = Path(path)
        directory = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
        if not directory.is_relative_to(self.root):
            raise AdapterRefusedError(f"lora_path {str(path)!r} is outside the adapter root; adapters are "
                                      "loaded from under the root only.")
        if not directory.exists():
            raise UnknownAdapterError(str(path))
        if not (directory / CONFIG_NAME).is_file():
            raise AdapterRefusedError(f"{str(path)!r} holds no {CONFIG_NAME}: not an adapter.")
        return directory

    def unregister(self, name: str) -> None:
        """Stop serving `name`: new requests get 404; running ones finish with the weights they have."""
        self.path(name)  # raises for unknown names
        with self._lock:
            self._registered.pop(name, None)
            self._unloaded.add(name)
            self._forget(name)

    # --- disk -> host ----------------------------------------------------------------------------------
    def read(self, ref: AdapterRef | str) -> HostAdapter:
        """The adapter in host memory, read from disk now if needed (blocking; raises its errors). A
        name is resolved first; what is in memory counts only for the same reference (a store tag
        moved, the adapter was reloaded: read again)."""
        ref = self.resolve(ref) if isinstance(ref, str) else ref
        with self._lock:
            cached = self._host.get(ref)
            if cached is not None:
                self._host.move_to_end(ref)
                return cached
        started = time.perf_counter()
        weights, rank = read_for_slots(ref.directory, self.slots)
        milliseconds = (time.perf_counter() - started) * 1000
        adapter = HostAdapter(ref.name, ref.directory, ref.generation, weights, rank, milliseconds)
        return self._keep(adapter)

    def prefetch(self, ref: AdapterRef) -> None:
        """Start reading the adapter in the background unless it is in host memory or loading already."""
        with self._lock:
            if ref in self._host or ref in self._loading:
                return
            self._failed.pop(ref, None)
            self._loading[ref] = self._executor.submit(self._load_in_background, ref)

    def _load_in_background(self, ref: AdapterRef) -> None:
        try:
            self.read(ref)
        except Exception as error:  # reported to the requests waiting for it
            with self._lock:
                self._failed[ref] = error
        finally:
            with self._lock:
                self._loading.pop(ref, None)
            if self.on_ready is not None:
                self.on_ready()

    def failure(self, ref: AdapterRef) -> Exception | None:
        """Why the background load of `ref` failed, or None."""
        with self._lock:
            return self._failed.get(ref)

    # --- host -> slot (engine thread, between steps) ------------------------------------------------
    def acquire(self, ref: AdapterRef | str) -> int | None:
        """A slot holding the adapter (a name is resolved first), pinned for one request; None while it
        loads (in the background) or while every slot is pinned."""
        ref = self.resolve(ref) if isinstance(ref, str) else ref
        name = ref.name
        for slot, held in enumerate(self.keys):
            if held == ref:
                self.pins[slot] += 1
                self._slot_lru.move_to_end(slot)
                self.stats["hits"] += 1
                self._notify("hit", name, 0.0)
                return slot
        with self._lock:
            adapter = self._host.get(ref)
            if adapter is not None:
                self._host.move_to_end(ref)
        if adapter is None:
            self.prefetch(ref)
            return None
        free = next((s for s in self._slot_lru if self.pins[s] == 0), None)
        if free is None:
            return None
        if self.owner[free] is not None:
            self.stats["evictions"] += 1
        started = time.perf_counter()
        self.slots.write_prepared(free, adapter.weights)
        self.owner[free], self.keys[free] = name, ref
        self.pins[free] = 1
        self._slot_lru.move_to_end(free)
        self.stats["misses"] += 1
        self._notify("miss", name, time.perf_counter() - started)
        return free

    def release(self, slot: int) -> None:
        self.pins[slot] -= 1

    def key(self, slot: int) -> AdapterRef | None:
        """What a slot holds."""
        return self.keys[slot]

    def use_rows(self, slots: Sequence[int] | None) -> None:
        """The slot of each row of the following forwards (-1: no adapter); None after them."""
        self.slots.set_rows(slots)

    def idle(self) -> None:
        """No request runs: free the decode rows' copies of their adapters."""
        self.slots.drop_row_copies()

    def _notify(self, event: str, name: str, seconds: float) -> None:
        for listener in self.listeners:
            listener(event, name, seconds)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _store_resolve(ref: str, root: Path | None = None) -> Path | None:
    """A reference (``support@prod``) in tailor's adapter store at `root` (None: the default store)."""
    try:
        path = AdapterStore(root).resolve(ref)
    except Exception:  # an unknown ref is an unknown adapter, whatever the store raises
        return None
    return path if (path / CONFIG_NAME).is_file() else None


def _store_refs(root: Path) -> list[str]:
    """NAME, NAME@VERSION and NAME@TAG of every adapter of the store at `root` (none if it is not one)."""
    refs = []
    try:
        store = AdapterStore(root)
        for name in store.names():
            versions = store.versions(name)
            if versions:
                refs += [name] + [f"{name}@{v}" for v in versions] + [f"{name}@{t}" for t in store.tags(name)]
    except Exception:  # a damaged store lists nothing rather than failing /v1/models
        return refs
    return refs


__all__ = ["AdapterManager", "AdapterRef", "AdapterRefusedError", "EngineAdapters", "HostAdapter",
           "UnknownAdapterError", "read_for_slots"]
