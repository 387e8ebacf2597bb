"""Where a run's examples come from: one source, or several mixed by weight.

    data: train.jsonl                                   # one file (or builtin:support, a directory ...)
    data:                                               # several, mixed
      - {path: a.parquet, weight: 0.7, columns: {prompt: question, completion: answer}}
      - {path: b.jsonl, weight: 0.3}

Mixing is exact and deterministic: each source first gives up its own validation share (val_fraction,
seeded), then the training mixture holds as many examples as the sources' training parts together, each
source contributing round(weight share x total) of them (drawn from its examples in a seeded order,
repeated when it has fewer), shuffled with the seed. The record of what was drawn, with each source's
sha256, goes to summary.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailor.data.errors import DataError, DataIssue
from tailor.data.example import Example

SOURCE_KEYS = ("path", "weight", "columns", "format", "split")


@dataclass(frozen=True)
class DataSource:
    """One place examples come from: a path or builtin spec, its mixing weight, its column mapping, its
    format (None: the run's), and for a saved DatasetDict its split."""

    path: str
    weight: float = 1.0
    columns: dict[str, str] = field(default_factory=dict)
    format: str | None = None
    split: str | None = None

    def load(self, default_format: str = "auto",
             default_columns: dict[str, str] | None = None) -> list[Example]:
        from tailor.data.load import load_examples

        return load_examples(self.path, self.format or default_format, self.columns or default_columns,
                             self.split)


def parse_sources(data: Any) -> tuple[list[DataSource], list[str]]:
    """`data` as written in a config (a path, or a list of paths and {path, weight, columns, format,
    split}) -> the sources and the problems found (each naming data[i] and its field)."""
    if data is None:
        return [], []
    entries = [data] if isinstance(data, str) else list(data) if isinstance(data, list) else None
    if entries is None or not entries:
        return [], [f"data: {data!r} must be a path, builtin:NAME, or a list of sources ({{path, weight}})"]
    sources, problems = [], []
    for index, entry in enumerate(entries):
        where = "data" if isinstance(data, str) else f"data[{index}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            problems.append(f"{where}: {entry!r} must be a path or a mapping with path: and weight:")
            continue
        unknown = [k for k in entry if k not in SOURCE_KEYS]
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; a source takes "
                            f"{', '.join(SOURCE_KEYS)}")
            continue
        path, weight = entry.get("path"), entry.get("weight", 1.0)
        if not isinstance(path, str) or not path:
            problems.append(f"{where}.path: missing; give the file, directory or builtin:NAME")
            continue
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            problems.append(f"{where}.weight: {weight!r} must be a number > 0 (weights are relative: 0.7 and "
                            "0.3, or 7 and 3)")
            continue
        columns = entry.get("columns") or {}
        if not isinstance(columns, dict):
            problems.append(f"{where}.columns: {columns!r} must map fields to columns, e.g. "
                            "{prompt: question, completion: answer}")
            continue
        sources.append(DataSource(path, float(weight), dict(columns), entry.get("format"),
                                  entry.get("split")))
    return sources, problems


def source_sha256(path: str) -> str | None:
    """sha256 of a source's bytes: a file's (what `sha256sum FILE` prints), or for a directory its files'
    relative names and bytes in name order; None for a builtin spec."""
    target = Path(path).expanduser()
    if not target.exists():
        return None
    digest = hashlib.sha256()
    files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
    for file in files:
        if target.is_dir():
            digest.update(f"{file.relative_to(target)}\0".encode())
        with open(file, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def mixture_counts(weights: list[float], total: int) -> list[int]:
    """Examples per source in a mixture of `total`: proportional to the weights, rounded by largest
    remainder so that they add up to `total` exactly."""
    shares = [w / sum(weights) * total for w in weights]
    counts = [int(s) for s in shares]
    by_remainder = sorted(range(len(weights)), key=lambda i: shares[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix(parts: list[list[Example]], weights: list[float], seed: int) -> tuple[list[Example], list[int]]:
    """The training mixture of `parts` by `weights` (see the module doc); returns it and the count drawn
    from each part."""
    rng = random.Random(seed)
    counts = mixture_counts(weights, sum(len(p) for p in parts))
    mixed: list[Example] = []
    for part, count in zip(parts, counts, strict=True):
        order = list(range(len(part)))
        drawn: list[int] = []
        while len(drawn) < count:  # a pass over the source in a seeded order, again while more are needed
            rng.shuffle(order)
            drawn += order[: count - len(drawn)]
        mixed += [part[i] for i in drawn]
    rng.shuffle(mixed)
    return mixed, counts


def load_sources(data: Any, val_data: str | None, val_fraction: float, format: str = "auto",
                 columns: dict[str, str] | None = None, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """A run's (train, validation) examples from its `data` sources (see the module doc): validation is
    `val_data` when given, else each source's builtin validation split or its seeded val_fraction share."""
    from tailor.data.batching import split_examples
    from tailor.data.load import BUILTIN_PREFIX, load_examples

    sources, problems = parse_sources(data)
    if problems:
        raise DataError([DataIssue("data", problem) for problem in problems])
    parts, validation = [], []
    for source in sources:
        examples = source.load(format, columns)
        if val_data or val_fraction <= 0:
            parts.append(examples)
        elif source.path.startswith(BUILTIN_PREFIX):
            name = source.path[len(BUILTIN_PREFIX):].split(":")[0]
            parts.append(examples)
            validation += load_examples(f"{BUILTIN_PREFIX}{name}:validation", source.format or format)
        else:
            try:
                train, held_out = split_examples(examples, val_fraction, seed)
            except ValueError:  # too few examples to hold some out: name the file
                raise DataError(DataIssue(
                    source.path, f"{len(examples)} example(s) are too few to hold out a validation split "
                    f"(val_fraction={val_fraction}).",
                    "add examples, or pass --val-data FILE (or set val_fraction=0).")) from None
            parts.append(train)
            validation += held_out
    if val_data:
        validation = load_examples(val_data, format, columns)
    train = parts[0] if len(parts) == 1 else mix(parts, [s.weight for s in sources], seed)[0]
    return train, validation


def data_record(data: Any, val_data: str | None, examples: tuple[list[Example], list[Example]],
                ) -> dict[str, Any]:
    """What a run trains on, for summary.json and the adapter's metadata: per source its sha256 (of the
    file's bytes, what `sha256sum FILE` prints; of a directory's files; of a builtin set's examples), its
    weight and the training examples drawn from it; `sha256` combines the sources."""
    sources, _ = parse_sources(data)
    if val_data:
        sources.append(DataSource(val_data))
    combined, records = hashlib.sha256(), []
    for index, source in enumerate(sources):
        role = "val_data" if val_data and index == len(sources) - 1 else "data"
        path = Path(source.path).expanduser()
        if path.exists():
            digest = source_sha256(source.path)
            record: dict[str, Any] = {"role": role, "path": str(path.resolve())}
            if path.is_file():
                record["bytes"] = path.stat().st_size
        else:  # builtin:...: the examples themselves (train and validation split)
            rows = [dataclasses.asdict(e) for part in examples for e in part]
            digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
            record = {"role": role, "spec": source.path, "examples": len(rows)}
        if role == "data" and len(sources) - bool(val_data) > 1:
            prefixes = (source.path, str(path))
            record.update(weight=source.weight,
                          drawn=sum(e.source.startswith(prefixes) for e in examples[0]))
            if source.columns:
                record["columns"] = dict(source.columns)
        records.append({**record, "sha256": digest})
        combined.update(f"{role}:{digest};".encode())
    return {"sha256": combined.hexdigest(), "sources": records,
            "examples": {"train": len(examples[0]), "validation": len(examples[1])}}


__all__ = ["DataSource", "SOURCE_KEYS", "data_record", "load_sources", "mix", "mixture_counts",
           "parse_sources", "source_sha256"]
