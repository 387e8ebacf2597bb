"""Run every entry of a comparison in its own process, collect the results, decide, write the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tailor.compare.entries import INIT_FROM, CompareEntry
from tailor.compare.worker import RESULT_NAME
from tailor.files import atomic_write_json, check_output_path
from tailor.report.compare import quality, write_compare_report

DEFAULT_PRICE_PER_HOUR = 1.0  # USD per hour of the machine the runs ran on; --price-per-hour overrides
DEFAULT_MARGIN = 0.02  # "within 2 points of the best" (absolute, on the quality metric)


def decide(rows: list[dict[str, Any]], margin: float) -> dict[str, Any] | None:
    """The cheapest method whose quality is within `margin` of the best (ties: the smaller artifact)."""
    scored = [r for r in rows if r.get("error") is None and quality(r) is not None]
    if not scored:
        return None
    best = max(scored, key=lambda r: quality(r))
    close = [r for r in scored if quality(r) >= quality(best) - margin]
    choice = min(close, key=lambda r: (r["cost_usd"], r.get("artifact_bytes") or 0, -quality(r)))
    return {"method": choice["method"], "quality": quality(choice), "best_method": best["method"],
            "best_quality": quality(best), "margin": margin, "cost_usd": choice["cost_usd"],
            "reason": (f"{choice['method']} reaches {quality(choice):.3f}, within {margin:g} of the best "
                       f"({best['method']}, {quality(best):.3f}), at the lowest cost "
                       f"(${choice['cost_usd']:.4f})")}


def run_compare(config: dict[str, Any], entries: list[CompareEntry], out: str | Path, eval_data: str,
                eval_n: int | None = None, price_per_hour: float = DEFAULT_PRICE_PER_HOUR,
                margin: float = DEFAULT_MARGIN, timeout: float | None = None,
                echo: Any = print, safety: bool = False) -> dict[str, Any]:
    """Train and evaluate each entry with the same `config` (TrainConfig values) -> out/compare.json,
    compare.md, compare.html. A method that fails is a row with its error; the others are kept. `safety`:
    each method's model also answers the safety probes (tailor.eval.safety): its row's "safety"."""
    rows = run_entries(config, entries, out, eval_data, eval_n, price_per_hour, timeout, echo, safety)
    result = {"methods": rows, "decision": decide(rows, margin), "price_per_hour": price_per_hour,
              "eval_data": eval_data, "eval_n": eval_n, "config": config}
    atomic_write_json(Path(out) / "compare.json", result)
    write_compare_report(Path(out), result)
    return result


def run_entries(config: dict[str, Any], entries: list[CompareEntry], out: str | Path, eval_data: str | None,
                eval_n: int | None = None, price_per_hour: float = DEFAULT_PRICE_PER_HOUR,
                timeout: float | None = None, echo: Any = print,
                safety: bool = False) -> list[dict[str, Any]]:
    """One worker process per entry; returns their result rows (eval_data None: train only)."""
    out = check_report_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for index, entry in enumerate(entries, 1):
        folder = out / entry.label
        overrides = dict(entry.overrides)
        if INIT_FROM in overrides:  # SFT then DPO: the earlier entry's adapter (worker.py: out/LABEL/run)
            overrides["init_adapter"] = str(out / overrides.pop(INIT_FROM) / "run" / "adapter")
        job = {"entry": {"label": entry.label, "method": entry.method, "overrides": overrides,
                         "shots": entry.shots},
               "config": config, "out": str(folder), "eval_data": eval_data, "eval_n": eval_n,
               "evaluate": eval_data is not None, "safety": safety}
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "job.json", job)
        (folder / RESULT_NAME).unlink(missing_ok=True)
        echo(f"[{index}/{len(entries)}] {entry.label} ...")
        started = time.perf_counter()
        row = _run_worker(folder, timeout)
        row.setdefault("method", entry.label)
        row["wall_seconds"] = round(time.perf_counter() - started, 1)
        row["cost_usd"] = round((row.get("train_seconds") or 0.0) / 3600 * price_per_hour, 6)
        rows.append(row)
        echo(f"[{index}/{len(entries)}] {entry.label}: {_status(row)}")
    return rows


def _status(row: dict[str, Any]) -> str:
    if row.get("error"):
        return "error: " + row["error"].splitlines()[-1]
    if quality(row) is None:
        return f"val loss {row.get('final_val_loss')}, {row['wall_seconds']:.0f} s"
    return f"quality {quality(row):.3f}, retention {row.get('retention')}, {row['wall_seconds']:.0f} s"


def check_report_dir(out: str | Path) -> Path:
    """A new or empty directory, or one that holds an earlier comparison or sweep (then it is redone)."""
    out = check_output_path(out, directory=True)
    earlier = any((out / name).exists() for name in ("compare.json", "sweep.json")) or any(
        (entry / "job.json").exists() for entry in out.iterdir()) if out.is_dir() else True
    if out.is_dir() and any(out.iterdir()) and not earlier:
        raise ValueError(f"out: {out} is not empty and holds no earlier comparison; nothing there is "
                         "touched. Give a new or empty directory (--out DIR).")
    return out


def _run_worker(folder: Path, timeout: float | None) -> dict[str, Any]:
    log = folder / "log.txt"
    command = [sys.executable, "-m", "tailor.compare.worker", str(folder / "job.json")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        with log.open("w") as handle:
            done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s (log: {log})"}
    if done.returncode != 0 or not (folder / RESULT_NAME).exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-12:]
        return {"error": f"exit code {done.returncode} (log: {log})\n" + "\n".join(tail)}
    return json.loads((folder / RESULT_NAME).read_text())


__all__ = ["DEFAULT_MARGIN", "DEFAULT_PRICE_PER_HOUR", "decide", "quality", "run_compare"]
