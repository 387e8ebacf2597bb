"""The built-in tasks: generated datasets, each with a fixed prompt format and an automatic metric.

    from tailor.data.tasks import TASKS, get_task, load_builtin
    task = get_task("code")
    test = task.build("test")                        # chat Examples [system, user, assistant]
    task.score(predictions, test)["score"]           # the task's metric, 0..1

`builtin:NAME[:train|validation|test]` names a task's split wherever data is read (tailor.data.load).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tailor.data.example import Example
from tailor.data.splits import SPLITS


@dataclass(frozen=True)
class BuiltinTask:
    """One built-in task: `build(split, n=None)` its deterministic examples, `score(predictions, examples)`
    its metric as {"score": 0..1, ...details}."""

    name: str
    kind: str
    description: str
    metric: str
    split_sizes: dict[str, int]
    build: Callable[..., list[Example]]
    score: Callable[[list[str], list[Example]], dict[str, Any]]

    def row(self) -> dict[str, Any]:
        """What `tailor data list --json` prints for this task."""
        return {"name": self.name, "kind": self.kind, "sizes": dict(self.split_sizes), "metric": self.metric,
                "description": self.description}


def _registry() -> dict[str, BuiltinTask]:
    from tailor.data.tasks import analysis, code, support, voice

    return {task.name: task for task in (support.TASK, code.TASK, analysis.TASK, voice.TASK)}


TASKS: dict[str, BuiltinTask] = _registry()


def get_task(name: str) -> BuiltinTask:
    """The built-in task called `name`.

    Raises:
        ValueError: no such task (the message lists every name).
    """
    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; use one of: {', '.join(TASKS)} "
                         "(`tailor data list` describes them).")
    return TASKS[name]


def builtin_specs() -> list[str]:
    """Every valid builtin spec: builtin:NAME and builtin:NAME:SPLIT for each task."""
    return [spec for name in TASKS for spec in (f"builtin:{name}", *(f"builtin:{name}:{s}" for s in SPLITS))]


def load_builtin(name: str, split: str = "train") -> list[Example]:
    """The examples of built-in task `name`'s `split` (train, validation or test).

    Raises:
        ValueError: unknown task or split (the message lists the valid ones).
    """
    task = get_task(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of built-in task {name!r}; use one of: "
                         f"{', '.join(SPLITS)}.")
    return task.build(split)


def task_of_spec(spec: str) -> BuiltinTask | None:
    """The built-in task a data spec names (builtin:NAME[:SPLIT]), or None for anything else."""
    parts = str(spec).split(":")
    if len(parts) >= 2 and parts[0] == "builtin" and parts[1] in TASKS:
        return TASKS[parts[1]]
    return None


__all__ = ["SPLITS", "TASKS", "BuiltinTask", "builtin_specs", "get_task", "load_builtin", "task_of_spec"]
