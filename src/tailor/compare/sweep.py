"""`tailor sweep`: a grid (or a seeded random subset of it) over training settings, ranked by the
validation loss each run ends with; the best one written out as a ready-to-run config."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import yaml

from tailor.compare.entries import CompareEntry
from tailor.compare.runner import run_entries
from tailor.config import coerce_field, field_names, load_config, save_config
from tailor.files import atomic_write_json, atomic_write_text

SWEEPABLE = ("rank", "lora_alpha", "lr", "lora_dropout", "target_modules", "method", "use_rslora",
             "use_dora", "max_steps", "batch_size", "weight_decay", "warmup_steps")


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """["rank=4,16", "lr=1e-4,1e-3", "target_modules=all-linear|q_proj;v_proj"] -> {field: values}.

    Values are separated by commas and read as YAML; a list value (target_modules) is written with `;`
    between names."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not raw.strip():
            raise ValueError(f"--grid {item!r}: expected FIELD=V1,V2,..., e.g. --grid rank=4,16")
        if key not in SWEEPABLE:
            hint = "" if key in field_names() else " (not a training config field)"
            raise ValueError(f"--grid {key!r}{hint}: choose from {', '.join(SWEEPABLE)}")
        values = []
        for text in raw.split(","):
            value = coerce_field(key, yaml.safe_load(text.strip()))  # YAML 1.1 reads 1e-3 as text
            values.append([v.strip() for v in value.split(";")] if isinstance(value, str) and ";" in value
                          else value)
        grid[key] = values
    if not grid:
        raise ValueError("give at least one --grid FIELD=V1,V2")
    return grid


def grid_points(grid: dict[str, list[Any]], sample: int | None, seed: int) -> list[dict[str, Any]]:
    points = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]
    if sample is not None and sample < len(points):
        points = random.Random(seed).sample(points, sample)
    return points


def _label(point: dict[str, Any]) -> str:
    def short(value: Any) -> str:
        return "+".join(value) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) \
            else str(value)

    return "_".join(f"{k}={short(v)}" for k, v in point.items()).replace("/", "-")


def run_sweep(config: dict[str, Any], grid: dict[str, list[Any]], out: str | Path, sample: int | None = None,
              timeout: float | None = None, echo: Any = print) -> dict[str, Any]:
    """Train every point of the grid (train only, validation loss at the end) -> out/sweep.json,
    sweep.md and best.yaml (the base config with the winning values)."""
    out = Path(out)
    points = grid_points(grid, sample, int(config.get("seed", 0)))
    for point in points:  # refuse a bad value before hours of training
        load_config(**{**config, **point})
    entries = [CompareEntry(_label(p), p.get("method", config.get("method", "lora")), p) for p in points]
    rows = run_entries(config, entries, out, None, timeout=timeout, echo=echo)
    for row, point in zip(rows, points, strict=True):
        row["settings"] = point
    finished = [r for r in rows if r.get("final_val_loss") is not None]
    ranked = sorted(finished, key=lambda r: r["final_val_loss"])
    best = ranked[0] if ranked else None
    result = {"grid": grid, "runs": rows, "best": best["method"] if best else None, "config": config}
    atomic_write_json(out / "sweep.json", result)
    lines = ["# Sweep", "", "| run | val loss | train s | trainable params |", "|---|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: (r.get("final_val_loss") is None, r.get("final_val_loss") or 0)):
        loss = f"{row['final_val_loss']:.4f}" if row.get("final_val_loss") is not None else \
            f"error: {(row.get('error') or 'no validation loss').splitlines()[0]}"
        lines.append(f"| {row['method']} | {loss} | {row.get('train_seconds') or 0:.0f} | "
                     f"{row.get('trainable_params') or 0:,} |")
    if best:
        best_config = load_config(**{**config, **best["settings"]}).replace(out=None, name=None, resume=False)
        save_config(best_config, out / "best.yaml")
        lines += ["", f"Best: **{best['method']}** (validation loss {best['final_val_loss']:.4f}); "
                  "its config: `best.yaml` (`tailor train best.yaml --out DIR`)."]
    atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")
    return result


__all__ = ["SWEEPABLE", "grid_points", "parse_grid", "run_sweep"]
