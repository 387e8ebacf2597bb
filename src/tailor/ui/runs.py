"""The run directories under one root, as the page shows them: what each run is, its curve, its scores.

A run is a directory `tailor train` wrote (config.yaml or metrics.jsonl in it), found up to
`MAX_DEPTH` levels below the root (a comparison keeps its runs at OUT/METHOD/run). A run is named by its
path relative to the root, and only names from that listing are ever opened: a name is looked up, never
joined onto a path, and files that resolve outside the root (symlinks out) are not read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tailor.compare.runner import DEFAULT_MARGIN, DEFAULT_PRICE_PER_HOUR, decide
from tailor.compare.worker import training_fields
from tailor.report.compare import COLUMNS, quality

MAX_DEPTH = 3
MARKERS = ("config.yaml", "metrics.jsonl")  # what makes a directory a run
EVAL_FIELDS = ("n", "field_accuracy", "exact_match", "json_valid", "val_loss", "per_field")


class UnknownRunError(LookupError):
    """No run of that name under the runs directory (HTTP 404)."""


class RunIndex:
    """The runs under `root` (read afresh on every call: a run that finishes shows up on reload)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise ValueError(f"runs directory {str(root)!r} does not exist or is not a directory; give the "
                             "folder `tailor train --out` wrote into (e.g. --runs runs).")

    def names(self) -> dict[str, Path]:
        """{name (relative path): directory} of every run, sorted by name."""
        found: dict[str, Path] = {}

        def walk(directory: Path, depth: int) -> None:
            try:
                children = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                return
            for child in children:
                if not child.resolve().is_relative_to(self.root):
                    continue  # a symlink out of the runs directory: not ours to show
                if any((child / marker).is_file() for marker in MARKERS):
                    found[child.relative_to(self.root).as_posix()] = child
                elif depth < MAX_DEPTH:
                    walk(child, depth + 1)

        walk(self.root, 1)
        return found

    def find(self, name: str) -> Path:
        directory = self.names().get(name)
        if directory is None:
            raise UnknownRunError(f"No run {name!r} under {self.root}: GET /api/runs lists the runs.")
        return directory

    def _read(self, directory: Path, file: str) -> tuple[Any, str | None]:
        """(parsed contents or None, a problem or None) of one of a run's files."""
        path = directory / file
        if not path.is_file() or not path.resolve().is_relative_to(self.root):
            return None, None
        try:
            text = path.read_text(encoding="utf-8")
            if file.endswith(".yaml"):
                return yaml.safe_load(text), None
            if file.endswith(".jsonl"):
                return [json.loads(line) for line in text.splitlines() if line.strip()], None
            return json.loads(text), None
        except (OSError, ValueError, yaml.YAMLError) as error:
            return None, f"{file} is unreadable ({type(error).__name__}: {error})"

    def run(self, name: str) -> dict[str, Any]:
        """One run: config, summary, the loss curve's points, eval.json, and what could not be read."""
        directory = self.find(name)
        parts = {file: self._read(directory, file)
                 for file in ("config.yaml", "summary.json", "metrics.jsonl", "eval.json")}
        points = [{k: p.get(k) for k in ("step", "loss", "val_loss")}
                  for p in parts["metrics.jsonl"][0] or [] if isinstance(p, dict)]
        return {"name": name, "config": parts["config.yaml"][0] or {},
                "summary": parts["summary.json"][0] or {}, "points": points, "eval": parts["eval.json"][0],
                "problems": [problem for _, problem in parts.values() if problem]}

    def rows(self) -> list[dict[str, Any]]:
        """One line per run for the list: method, model, steps, losses, quality."""
        rows = []
        for name in self.names():
            run = self.run(name)
            config, summary = run["config"], run["summary"]
            tuned = (run["eval"] or {}).get("tuned") or {}
            rows.append({"name": name, "method": config.get("method") or summary.get("method"),
                         "model": config.get("model") or summary.get("model"), "steps": summary.get("steps"),
                         "final_train_loss": summary.get("final_train_loss"),
                         "final_val_loss": summary.get("final_val_loss"), "quality": quality(tuned),
                         "problems": run["problems"]})
        return rows

    def compare(self, names: list[str], price_per_hour: float = DEFAULT_PRICE_PER_HOUR,
                margin: float = DEFAULT_MARGIN) -> dict[str, Any]:
        """The comparison report's rows, columns and decision (tailor.compare) for runs already trained:
        the training columns from summary.json, the task metrics of the tuned model from eval.json."""
        runs = {name: self.run(name) for name in names}
        rows = []
        for name, run in runs.items():
            tuned = (run["eval"] or {}).get("tuned") or {}
            retention = ((run["eval"] or {}).get("retention") or {}).get("tuned") or {}
            row = {"method": name, **training_fields(run["summary"], Path(name))}
            row.update({key: tuned.get(key) for key in EVAL_FIELDS})
            row["val_loss"] = tuned.get("val_loss", row.get("final_val_loss"))
            row["retention"] = retention.get("accuracy")
            row["cost_usd"] = round((row.get("train_seconds") or 0.0) / 3600 * price_per_hour, 6)
            rows.append(row)
        return {"methods": rows, "decision": decide(rows, margin), "price_per_hour": price_per_hour,
                "columns": [{"key": key, "header": header, "format": fmt} for key, header, fmt in COLUMNS],
                "curves": {name: run["points"] for name, run in runs.items()}}


__all__ = ["RunIndex", "UnknownRunError"]
