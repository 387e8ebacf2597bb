"""The adapter store: named, versioned adapters with movable tags, lineage, and instant rollback.

A directory (default ``~/.cache/tailor/adapters``; ``$TAILOR_ADAPTERS`` overrides; ``$TAILOR_CACHE``
moves the default with tailor's other caches)::

    <root>/<name>/
        1/, 2/, ...     one version each: the adapter's own files (PEFT's two, tailor_metadata.json)
                        plus store_record.json (when added, from where, checksum, parents)
        tags.json       {"next_version": N, "tags": {"prod": {"version": 3, "history": [1, 2]}}}
        .lock           writers of <name> take it in turn (flock; released by the OS if one is killed)

References: ``NAME@3`` (a version), ``NAME@prod`` (a tag), ``NAME`` or ``NAME@latest`` (the newest
version). A version directory is written whole and renamed into place; every change of tags is one
atomic replace of tags.json, so a rollback takes milliseconds and a process killed at any instant leaves
the store readable, each tag at its old or its new version. Names are names, never paths.

This module imports no torch: `tailor adapters list` stays quick, and a server can `resolve` cheaply.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tailor.adapters.layout import (
    ADAPTER_FILES,
    CONFIG_NAME,
    METADATA_NAME,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    check_adapter_dir,
    read_store_json,
)
from tailor.adapters.refs import (
    LATEST,
    NAME_RE,
    StoreError,
    check_name,
    check_tag,
    key_metric,
    parse_ref,
)
from tailor.files import (
    atomic_output,
    atomic_write_json,
    check_output_path,
    directory_size,
    remove_stale_temporaries,
    tailor_cache_dir,
)

try:  # POSIX; elsewhere the store works without a writer lock
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

RECORD_NAME = "store_record.json"
TAGS_NAME = "tags.json"
LOCK_NAME = ".lock"
def default_root() -> Path:
    if os.environ.get("TAILOR_ADAPTERS"):
        return Path(os.environ["TAILOR_ADAPTERS"]).expanduser()
    return tailor_cache_dir() / "adapters"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class AdapterStore:
    """The store at `root` (default: `default_root()`)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()

    # ------------------------------------------------------------------------------------------ paths
    def _name_dir(self, name: str) -> Path:
        check_name(name)
        path = self.root / name
        # defence in depth: a valid name is one path component, so this always holds
        if path.resolve().parent != self.root.resolve():
            raise StoreError(f"adapter name {name!r} would leave the store root {self.root}.")
        return path

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name))

    def versions(self, name: str) -> list[int]:
        directory = self._name_dir(name)
        if not directory.is_dir():
            return []
        return sorted(int(p.name) for p in directory.iterdir()
                      if p.name.isdigit() and (p / CONFIG_NAME).is_file())

    def tags(self, name: str) -> dict[str, dict[str, Any]]:
        return self._state(name)["tags"]

    def _state(self, name: str) -> dict[str, Any]:
        path = self._name_dir(name) / TAGS_NAME
        state = read_store_json(path, "restore it from a backup, or delete it (the versions stay; only the "
                                      "tags are lost).")
        if state is None:
            return {"format": 1, "next_version": 1, "tags": {}}
        if not isinstance(state, dict) or not isinstance(state.get("tags"), dict):
            raise StoreError(f"{path}: not a tags file of the store; restore it from a backup, or delete it "
                             "(the versions stay; only the tags are lost).")
        return state

    def _write_state(self, name: str, state: dict[str, Any]) -> None:
        atomic_write_json(self._name_dir(name) / TAGS_NAME, state)  # one os.replace: all or nothing

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        """Exclusive writer access to `name` (the OS drops the lock of a killed process); cleans up what a
        killed writer left (temporaries, a directory swap cut in half) before the new write."""
        directory = self._name_dir(name)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot write the adapter store at {self.root} ({error.strerror or error}); "
                             "set $TAILOR_ADAPTERS or --store to a directory you can write to.") from None
        with open(directory / LOCK_NAME, "a+") as handle:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                remove_stale_temporaries(directory)
                yield directory
            finally:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------------------------------ resolve
    def resolve_version(self, ref: str) -> tuple[str, int]:
        """(name, version) a reference points at.

        Raises:
            StoreError: unknown name, version or tag (the message lists what exists).
        """
        name, selector = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise StoreError(f"no adapter named {name!r} in the store {self.root} (names: {known}). Add one "
                             f"with `tailor adapters add {name} DIR`.")
        if selector is None or selector == LATEST:
            return name, versions[-1]
        if selector.isdigit():
            if int(selector) not in versions:
                raise StoreError(f"{name} has no version {selector}; its versions are "
                                 f"{', '.join(map(str, versions))}.")
            return name, int(selector)
        tags = self.tags(name)
        if selector not in tags:
            known = ", ".join(sorted(tags)) or "none"
            raise StoreError(f"{name} has no tag {selector!r} (tags: {known}). Set one with "
                             f"`tailor adapters tag {name}@{selector} VERSION`.")
        version = tags[selector]["version"]
        if version not in versions:
            raise StoreError(f"{name}@{selector} points at version {version}, which was removed; move it "
                             f"with `tailor adapters tag {name}@{selector} VERSION`.")
        return name, version

    def resolve(self, ref: str) -> Path:
        """The directory of the adapter `ref` names (NAME, NAME@VERSION, NAME@TAG): PEFT-format, loadable by
        tailor, PEFT and vLLM as it is."""
        name, version = self.resolve_version(ref)
        return self.root / name / str(version)

    def ref_for(self, path: str | os.PathLike) -> str | None:
        """'NAME@VERSION' when `path` is a version directory of this store, else None."""
        try:
            path = Path(path).resolve()
            relative = path.relative_to(self.root.resolve())
        except (OSError, ValueError):
            return None
        parts = relative.parts
        if len(parts) == 2 and NAME_RE.fullmatch(parts[0]) and parts[1].isdigit():
            return f"{parts[0]}@{parts[1]}"
        return None

    # ------------------------------------------------------------------------------------------ writes
    def add(self, name: str, directory: str | os.PathLike) -> tuple[str, bool]:
        """Copy the adapter in `directory` into the store as the next version of `name`.

        Returns (reference, created): an adapter identical to a stored version (same weights and config)
        is not stored twice; its existing reference comes back with created=False.
        """
        check_name(name)
        source = Path(directory)
        config = check_adapter_dir(source)
        files = [f for f in ADAPTER_FILES if (source / f).is_file()]
        weights_file = WEIGHTS_NAME if WEIGHTS_NAME in files else PICKLE_WEIGHTS_NAME
        checksum = file_sha256(source / weights_file)
        try:
            check_output_path(self.root, directory=True)
        except ValueError as error:
            raise StoreError(f"{error} (the adapter store; set $TAILOR_ADAPTERS or --store)") from None
        with self._locked(name) as name_dir:
            for version in self.versions(name):
                record = self.record(name, version)
                same_config = read_store_json(name_dir / str(version) / CONFIG_NAME, "") == config
                if record.get("weights_sha256") == checksum and same_config:
                    return f"{name}@{version}", False
            state = self._state(name)
            existing = self.versions(name)
            version = max(state.get("next_version", 1), (existing[-1] + 1) if existing else 1)
            metadata = read_store_json(source / METADATA_NAME, "") if METADATA_NAME in files else None
            record = {
                "name": name, "version": version, "added": _now(), "source": str(source.resolve()),
                "weights_sha256": checksum, "files": files,
                "parents": self._parents(metadata),
            }
            with atomic_output(name_dir / str(version), directory=True) as tmp:
                for file in files:
                    shutil.copyfile(source / file, tmp / file)
                (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            state["next_version"] = version + 1
            self._write_state(name, state)
        return f"{name}@{version}", True

    def _parents(self, metadata: Any) -> list[dict[str, Any]]:
        """The parents a combination names, each with its store reference when it has one."""
        parents = metadata.get("parents") if isinstance(metadata, dict) else None
        result = []
        for parent in parents or []:
            if not isinstance(parent, dict):
                continue
            ref = parent.get("ref") or (self.ref_for(parent["path"]) if parent.get("path") else None)
            result.append({**parent, "ref": ref})
        return result

    def tag(self, tag_ref: str, target: str | int) -> tuple[int | None, int]:
        """Point NAME@TAG at a version (`target`: 3, "3", "NAME@3", another tag); one atomic write.

        Returns (previous version or None, new version).
        """
        name, tag = parse_ref(tag_ref)
        if tag is None:
            raise StoreError(f"{tag_ref!r} names no tag; write NAME@TAG VERSION, e.g. {name}@prod 3.")
        check_tag(tag)
        target = str(target)
        target_ref = target if "@" in target else f"{name}@{target}"
        if self.resolve_version(target_ref)[0] != name:
            raise StoreError(f"a tag of {name} can only point at a version of {name}, not at {target_ref}.")
        with self._locked(name):
            version = self.resolve_version(target_ref)[1]  # again under the lock: no rm in between
            state = self._state(name)
            entry = state["tags"].get(tag)
            previous = entry["version"] if entry else None
            if previous == version:
                return previous, version
            history = list(entry["history"]) if entry else []
            if previous is not None:
                history.append(previous)
            state["tags"][tag] = {"version": version, "history": history, "updated": _now()}
            self._write_state(name, state)
        return previous, version

    def rollback(self, tag_ref: str) -> tuple[int, int]:
        """Move NAME@TAG back to the version it pointed at before; one atomic write. Returns (from, to)."""
        name, tag = parse_ref(tag_ref)
        if tag is None or tag.isdigit() or tag == LATEST:
            raise StoreError(f"rollback moves a tag: write NAME@TAG (e.g. {name}@prod), not {tag_ref!r}.")
        with self._locked(name):
            state = self._state(name)
            entry = state["tags"].get(tag)
            if entry is None:
                known = ", ".join(sorted(state["tags"])) or "none"
                raise StoreError(f"{name} has no tag {tag!r} (tags: {known}).")
            if not entry["history"]:
                raise StoreError(f"{name}@{tag} has pointed at version {entry['version']} only: there is "
                                 "nothing to roll back to. Point it elsewhere with `tailor adapters tag "
                                 f"{name}@{tag} VERSION`.")
            history = list(entry["history"])
            previous = history.pop()
            if previous not in self.versions(name):
                raise StoreError(f"{name}@{tag} pointed at version {previous} before, but that version was "
                                 f"removed; choose one with `tailor adapters tag {name}@{tag} VERSION`.")
            current = entry["version"]
            state["tags"][tag] = {"version": previous, "history": history, "updated": _now()}
            self._write_state(name, state)
        return current, previous

    def remove(self, ref: str, force: bool = False) -> list[str]:
        """Delete a version (NAME@3) or every version of a name (NAME). A version a tag points at is kept
        unless `force` (then its tags go too). Returns what was removed."""
        name, selector = parse_ref(ref)
        if selector is not None and not selector.isdigit():
            if selector == LATEST:
                raise StoreError(f"name the version to remove ({name}@{self.resolve_version(ref)[1]}), not "
                                 "latest.")
            version = self.resolve_version(ref)[1]
            raise StoreError(f"{ref} is a tag (-> {name}@{version}); `rm` removes versions: "
                             f"`tailor adapters rm {name}@{version}`. Tags move with `tag` and `rollback`.")
        versions = self.versions(name)
        if not versions:
            self.resolve_version(ref)  # raises: unknown name
        doomed = versions if selector is None else [self.resolve_version(ref)[1]]
        with self._locked(name) as name_dir:
            state = self._state(name)
            tagged = {t: e["version"] for t, e in state["tags"].items() if e["version"] in doomed}
            if tagged and not force:
                which = ", ".join(f"{name}@{t} -> {v}" for t, v in sorted(tagged.items()))
                raise StoreError(f"not removed: tags point at it ({which}). Move the tags first (`tailor "
                                 "adapters tag` / `rollback`), or pass --force to remove the tags too.")
            for tag in tagged:
                del state["tags"][tag]
            if tagged:
                self._write_state(name, state)
            removed = []
            for version in doomed:
                target = name_dir / str(version)
                aside = name_dir / f".{version}.tmp-removed"  # a temporary's name: a later writer's cleanup
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(target, aside)  # out of sight at once; deleted now (if killed: by the next writer)
                shutil.rmtree(aside, ignore_errors=True)
                removed.append(f"{name}@{version}")
            removed += [f"{name}@{t} (tag)" for t in sorted(tagged)]
        if selector is None:
            shutil.rmtree(name_dir, ignore_errors=True)
        return removed

    # ------------------------------------------------------------------------------------------ reads
    def record(self, name: str, version: int) -> dict[str, Any]:
        path = self._name_dir(name) / str(version) / RECORD_NAME
        return read_store_json(path, "add the adapter again.") or {}

    def info(self, ref: str) -> dict[str, Any]:
        """Everything the store knows about one version: record, adapter config, metadata, tags, size."""
        name, version = self.resolve_version(ref)
        directory = self.root / name / str(version)
        config = read_store_json(directory / CONFIG_NAME, "add the adapter again.") or {}
        metadata = read_store_json(directory / METADATA_NAME, "add the adapter again.")
        tags = sorted(t for t, e in self.tags(name).items() if e["version"] == version)
        return {
            "ref": f"{name}@{version}", "path": str(directory), "tags": tags,
            "size_bytes": directory_size(directory), "record": self.record(name, version),
            "adapter_config": config, "metadata": metadata,
        }

    def rows(self) -> list[dict[str, Any]]:
        """One row per version for `list`: name, version, tags, base, rank, targets, size, key metric."""
        rows = []
        for name in self.names():
            tags = self.tags(name)
            for version in self.versions(name):
                info = self.info(f"{name}@{version}")
                config, metadata = info["adapter_config"], info["metadata"] or {}
                base = (metadata.get("base") or {}).get("name") or config.get("base_model_name_or_path")
                metric = key_metric(metadata.get("metrics"))
                combination = metadata.get("combination")
                if metric is None and combination:
                    metric = (f"{combination.get('method')} error", combination.get("relative_error"))
                rows.append({
                    "ref": f"{name}@{version}", "name": name, "version": version,
                    "tags": sorted(t for t, e in tags.items() if e["version"] == version),
                    "base": base, "rank": config.get("r"), "targets": _targets(config.get("target_modules")),
                    "size_bytes": info["size_bytes"], "metric": metric,
                })
        return rows

    def lineage(self, ref: str, depth: int = 0, seen: frozenset[str] = frozenset()) -> list[str]:
        """Indented lines: the adapter, then its parents (store references followed), recursively."""
        name, version = self.resolve_version(ref)
        full = f"{name}@{version}"
        info = self.info(full)
        metadata = info["metadata"] or {}
        lines = [f"{'  ' * depth}{full}{_origin(metadata)}"]
        if full in seen or depth > 20:
            return lines
        for parent in info["record"].get("parents") or self._parents(metadata):
            weight = parent.get("weight")
            prefix = f"{'  ' * (depth + 1)}x {weight:g} " if isinstance(weight, (int, float)) else ""
            parent_ref = parent.get("ref")
            if parent_ref:
                try:
                    sub = self.lineage(parent_ref, depth + 1, seen | {full})
                except StoreError:
                    sub = [f"{'  ' * (depth + 1)}{parent_ref} (no longer in the store)"]
                lines.append(prefix + sub[0].lstrip() if prefix else sub[0])
                lines += sub[1:]
            else:
                lines.append(f"{prefix or '  ' * (depth + 1)}{parent.get('path')} (outside the store)")
        return lines

    def diff(self, ref_a: str, ref_b: str) -> list[tuple[str, Any, Any]]:
        """(key, value in a, value in b) for every config, training, data, base and metric entry that
        differs between two adapters."""
        flat_a, flat_b = _comparable(self.info(ref_a)), _comparable(self.info(ref_b))
        keys = sorted(set(flat_a) | set(flat_b))
        return [(k, flat_a.get(k), flat_b.get(k)) for k in keys if flat_a.get(k) != flat_b.get(k)]


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _targets(targets: Any) -> str:
    """'q_proj,v_proj' for a list of names or full module paths; a regex as it is."""
    if isinstance(targets, list):
        leaves = sorted({str(t).rsplit(".", 1)[-1] for t in targets})
        shown = ",".join(leaves)
        return shown if len(leaves) == len(targets) else f"{shown} ({len(targets)} modules)"
    return str(targets)


def _origin(metadata: dict[str, Any]) -> str:
    combination = metadata.get("combination")
    if combination:
        return f"  combined: {combination.get('method')}, rank {combination.get('rank')}"
    train = metadata.get("train_config") or {}
    data = metadata.get("data") or {}
    if train:
        sha = (data.get("sha256") or "")[:12]
        return f"  trained: {train.get('method')} on {train.get('data')} (data sha256 {sha or '?'})"
    return ""


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def _comparable(info: dict[str, Any]) -> dict[str, Any]:
    metadata = info["metadata"] or {}
    flat: dict[str, Any] = {}
    config = {k: v for k, v in info["adapter_config"].items()
              if k in ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "rank_pattern",
                       "alpha_pattern", "lora_dropout", "bias", "modules_to_save", "base_model_name_or_path")}
    _flatten("adapter", config, flat)
    for key in ("base", "precision", "train_config", "data", "metrics", "combination"):
        if metadata.get(key) is not None:
            _flatten(key, metadata[key], flat)
    parents = metadata.get("parents") or []
    if parents:
        flat["parents"] = [f"{p.get('ref') or p.get('path')} x {p.get('weight')}" for p in parents]
    flat["size_bytes"] = info["size_bytes"]
    flat["weights_sha256"] = info["record"].get("weights_sha256")
    return flat


def locate(argument: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[Path, str | None]:
    """An adapter argument as given on a command line: an existing directory (and its store reference if
    it lies in the store), else a store reference (NAME, NAME@VERSION, NAME@TAG) resolved to its
    directory. Anything else comes back as a path, for the adapter reader to report as missing."""
    store = AdapterStore(root)
    path = Path(argument)
    if path.exists():
        return path, store.ref_for(path)
    text = str(argument)
    name = text.partition("@")[0]
    if NAME_RE.fullmatch(name) and (store.root / name).is_dir():
        resolved_name, version = store.resolve_version(text)
        return store.root / resolved_name / str(version), f"{resolved_name}@{version}"
    return path, None


def resolve(ref: str, root: str | os.PathLike | None = None) -> Path:
    """The adapter directory `ref` (NAME, NAME@VERSION, NAME@TAG) names in the store at `root`."""
    return AdapterStore(root).resolve(ref)


__all__ = ["AdapterStore", "StoreError", "check_name", "check_tag", "default_root", "locate", "parse_ref",
           "resolve"]
