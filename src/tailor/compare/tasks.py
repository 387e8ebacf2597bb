"""`tailor compare --recipe tasks`: the same methods on each built-in task -> a methods x tasks table with
the decision per task (which method to use there, by tailor.compare.runner.decide).

Each task is one ordinary comparison in out/TASK/ (its compare.json, .md, .html): the recipe's config with
`data: builtin:TASK`, scored on builtin:TASK:test by the task's own metric (tailor.data.tasks). This module
runs them in turn and writes out/tasks.json and out/tasks.md (tailor.report.tasks).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tailor.compare.entries import parse_entries
from tailor.compare.runner import DEFAULT_MARGIN, DEFAULT_PRICE_PER_HOUR, check_report_dir, run_compare
from tailor.files import atomic_write_json


def run_task_compare(config: dict[str, Any], methods: str, tasks: list[str], out: str | Path,
                     eval_n: int | None = None, shots: int = 3,
                     method_overrides: dict[str, dict[str, Any]] | None = None,
                     price_per_hour: float = DEFAULT_PRICE_PER_HOUR, margin: float = DEFAULT_MARGIN,
                     timeout: float | None = None, echo: Any = print) -> dict[str, Any]:
    """Compare `methods` on each built-in task of `tasks` with the same `config` (TrainConfig values; its
    data is replaced by each task's) -> out/TASK/ per task, out/tasks.json and out/tasks.md.

    Raises:
        ValueError: an unknown task or method name, or a config that does not validate (ConfigError),
            before anything runs.
    """
    from tailor.config import load_config
    from tailor.data.tasks import get_task
    from tailor.report.tasks import write_tasks_report

    for name in tasks:
        get_task(name)
    load_config(**{**{k: v for k, v in config.items() if k != "out"}, "data": f"builtin:{tasks[0]}"})
    out = check_report_dir(out)
    per_task: dict[str, Any] = {}
    started = time.perf_counter()
    plans = {name: parse_entries(methods, {**config, "data": f"builtin:{name}"}, shots, method_overrides)
             for name in tasks}  # every method name checked before the first one trains
    for index, name in enumerate(tasks, 1):
        echo(f"== task {index}/{len(tasks)}: {name}")
        task_config = {**config, "data": f"builtin:{name}"}
        per_task[name] = run_compare(task_config, plans[name], out / name, f"builtin:{name}:test", eval_n,
                                     price_per_hour, margin, timeout, echo)
    result = {"tasks": {name: {"metric": get_task(name).metric, "methods": r["methods"],
                               "decision": r["decision"]} for name, r in per_task.items()},
              "methods": [entry.label for entry in plans[tasks[0]]], "eval_n": eval_n, "config": config,
              "price_per_hour": price_per_hour, "margin": margin,
              "wall_seconds": round(time.perf_counter() - started, 1)}
    atomic_write_json(out / "tasks.json", result)
    write_tasks_report(out, result)
    return result


__all__ = ["run_task_compare"]
