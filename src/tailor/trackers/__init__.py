"""Experiment trackers: a run's config, metrics, evaluation tables and adapter, sent where a team watches
its runs (TensorBoard, MLflow, Weights & Biases) as well as to the run directory.

`report_to` (a training config field) names them. Each tracker's run is tied to the tailor run directory:
`trackers.json` there keeps what reopens it (MLflow's run id, wandb's id), so `tailor train --resume` and
a later `tailor eval RUN` log into the same tracker run. Where each tracker writes is its own setting, read
from its usual environment variables (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, WANDB_PROJECT,
WANDB_MODE ...); TensorBoard writes into the run directory (RUN/tensorboard).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tailor.files import atomic_write_json
from tailor.trackers.backends import BACKENDS, Tracker

TRACKERS = tuple(BACKENDS)  # tensorboard, mlflow, wandb
STATE_FILE = "trackers.json"


def tracker_names(report_to: str | Sequence[str] | None) -> list[str]:
    """`report_to` as a list: None, "none" and [] are no tracker; "all" is every one; "a,b" is two."""
    if report_to is None:
        return []
    names = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names = [n.strip().lower() for n in names if n.strip()]
    if names in (["none"], []):
        return []
    return list(TRACKERS) if names == ["all"] else names


def tracker_problems(report_to: str | Sequence[str] | None) -> list[str]:
    """What is wrong with `report_to`: an unknown name (with the valid ones), a tracker not installed (with
    the package to install). Checked with the config, before any model is loaded."""
    problems = []
    for name in tracker_names(report_to):
        backend = BACKENDS.get(name)
        if backend is None:
            problems.append(f"report_to: {name!r} is not a tracker tailor knows; choose from "
                            f"{', '.join(TRACKERS)} (or none, all)")
        elif importlib.util.find_spec(backend.module) is None:
            problems.append(f"report_to: {name} is not installed; pip install '{backend.package}' "
                            "(or tailor[trackers], which has all three)")
        elif (problem := backend.problem()) is not None:
            problems.append(problem)
    return problems


class Trackers:
    """The trackers of one run, opened together: each call goes to every one."""

    def __init__(self, trackers: list[Tracker], run_dir: Path) -> None:
        self.trackers, self.run_dir = trackers, run_dir

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step)

    def log_summary(self, summary: dict[str, Any], prefix: str = "") -> None:
        """The scalar values of `summary` (nested keys joined by /), e.g. the run's final figures."""
        scalars = flat_scalars(summary, prefix)
        for tracker in self.trackers:
            tracker.log_summary(scalars)

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        for tracker in self.trackers:
            tracker.log_table(name, rows)

    def log_artifact(self, directory: Path, name: str) -> None:
        for tracker in self.trackers:
            tracker.log_artifact(directory, name)

    def finish(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.finish(failed)
        self.trackers = []


def open_trackers(report_to: str | Sequence[str] | None, run_dir: str | Path, run_name: str,
                  config: dict[str, Any] | None = None) -> Trackers:
    """Start (or reopen, when run_dir/trackers.json says they were started) the named trackers for the run
    in `run_dir`, logging `config` as the run's parameters when given."""
    run_dir = Path(run_dir)
    state_path = run_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    opened = []
    for name in tracker_names(report_to):
        tracker = BACKENDS[name].start(run_dir, run_name, state.get(name))
        if config is not None:
            tracker.log_config(config)
        state[name] = tracker.reopen_state()
        opened.append(tracker)
    if opened:
        atomic_write_json(state_path, state)
    return Trackers(opened, run_dir)


def log_evaluation(report_to: str | Sequence[str] | None, run_dir: str | Path,
                   result: dict[str, Any]) -> None:
    """`tailor eval`'s result (eval.json) into the run's trackers: each side's figures as eval/base/...
    and eval/tuned/..., a metric x side table, and the sample answers. A tracker that cannot start here
    is skipped with a note: the evaluation itself is already written."""
    problems = tracker_problems(report_to)
    if problems:
        print("trackers not updated: " + "; ".join(problems), flush=True)
        return
    run_dir = Path(run_dir)
    trackers = open_trackers(report_to, run_dir, run_dir.name)
    sides = {side: result.get(side) or {} for side in ("base", "tuned")}
    trackers.log_summary(sides, prefix="eval/")
    scalars = {side: flat_scalars(values) for side, values in sides.items()}
    metrics = list(dict.fromkeys(k for values in scalars.values() for k in values))
    trackers.log_table("eval_comparison", [{"metric": m, "base": scalars["base"].get(m),
                                            "tuned": scalars["tuned"].get(m)} for m in metrics])
    if result.get("samples"):
        trackers.log_table("eval_samples", result["samples"])
    trackers.finish()


def flat_scalars(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"a": {"b": 1}, "c": "x"} -> {"a/b": 1.0}: numbers only (bools and text left out), keys joined by /."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


__all__ = ["STATE_FILE", "TRACKERS", "Tracker", "Trackers", "flat_scalars", "log_evaluation", "open_trackers",
           "tracker_names", "tracker_problems"]
