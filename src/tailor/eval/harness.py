"""`tailor eval --harness TASKS`: lm-evaluation-harness tasks, the base model against the tuned one, scored
through tailor's own server.

lm-eval's `local-completions` model speaks to an OpenAI completions endpoint. tailor serves the base model
and the adapter from one server in this process (the request's model name picks the side) on a free
loopback port, so the scores are those of what `tailor serve` answers: likelihood tasks (multiple
choice) send token-id prompts with `echo`, `logprobs` and `max_tokens` 0 or 1 and read the prompt's
log-probabilities; generation tasks send completions with stop strings. A full fine-tune's model is
served by a second server, after the base's.

Nothing is downloaded: the run sets HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1, so a task whose dataset is
not on this machine fails at once. A task of your own works offline as a YAML file with
`dataset_path: json` and `dataset_kwargs: {data_files: {test: FILE.jsonl}}`; TASKS may name such a file,
whose relative data files are then read beside it (docs/evaluation.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

HARNESS_INSTALL = "pip install 'tailor[harness]'"  # lm-eval with its API models (aiohttp, tenacity)
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
TUNED_NAME = "tuned"  # the tuned side's model name on the in-process server


def parse_tasks(spec: str) -> list[str | dict[str, Any]]:
    """TASKS: comma-separated lm-eval task names or task YAML files (a file becomes its config, with its
    relative `data_files` made relative to the file).

    Raises:
        ValueError: no task, or a YAML file that cannot be read or names no task.
    """
    tasks: list[str | dict[str, Any]] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        path = Path(item).expanduser()
        if path.suffix.lower() not in (".yaml", ".yml"):
            tasks.append(item)
            continue
        if not path.is_file():
            raise ValueError(f"--harness: no such task file {path}.")
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ValueError(f"--harness: {path} is not a YAML file lm-eval can use ({error}); give a task "
                             "name instead, with --harness-include DIR for its folder.") from None
        if not isinstance(config, dict) or not config.get("task"):
            raise ValueError(f"--harness: {path} has no `task:` name; an lm-eval task YAML starts with one.")
        tasks.append(_files_beside(config, path.parent))
    if not tasks:
        raise ValueError("--harness needs at least one task: lm-eval task names or task YAML files, "
                         "comma-separated.")
    return tasks


def _files_beside(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The config with relative data_files (a path, a list, or a split -> path(s) mapping) under `folder`."""
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")

    def beside(value):
        if isinstance(value, str):
            return value if Path(value).is_absolute() or "://" in value else str((folder / value).resolve())
        if isinstance(value, list):
            return [beside(v) for v in value]
        if isinstance(value, dict):
            return {k: beside(v) for k, v in value.items()}
        return value

    if files is not None:
        kwargs["data_files"] = beside(files)
        config = {**config, "dataset_kwargs": kwargs}
    return config


def task_names(tasks: list[str | dict[str, Any]]) -> list[str]:
    return [t if isinstance(t, str) else str(t["task"]) for t in tasks]


@contextlib.contextmanager
def serving(app, log_level: str = "warning") -> Iterator[str]:
    """`app` on a free loopback port, served by uvicorn in a thread of this process: its URL."""
    import socket

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, name="tailor-harness-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        raise RuntimeError("the evaluation server did not start within 60 s.")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def run_lm_eval(url: str, served: str, tokenizer_dir: str | Path, tasks: list[str | dict[str, Any]], *,
                limit: int | None = None, include: str | Path | None = None, batch_size: int = 8,
                max_length: int = 2048) -> dict[str, dict[str, Any]]:
    """lm-eval's `local-completions` against the server at `url` with model name `served`:
    {task: {metric: value, "higher_is_better": {metric: bool}}} (lm-eval's "acc,none" is written "acc";
    other filters keep their suffix)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = {"base_url": f"{url}/v1/completions", "model": served, "tokenizer": str(tokenizer_dir),
                  "tokenizer_backend": "huggingface", "tokenized_requests": True, "batch_size": batch_size,
                  "max_length": max_length, "max_retries": 1}
    manager = TaskManager(include_path=str(include)) if include else TaskManager()
    output = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=tasks,
                                     limit=limit, task_manager=manager, log_samples=False)
    results: dict[str, dict[str, Any]] = {}
    for task, metrics in (output or {}).get("results", {}).items():
        results[task] = {key.removesuffix(",none"): value for key, value in metrics.items()
                         if isinstance(value, int | float) and not isinstance(value, bool)}
    for task, better in (output or {}).get("higher_is_better", {}).items():  # the direction of a change
        results.setdefault(task, {})
        results[task]["higher_is_better"] = {metric: bool(up) for metric, up in better.items()}
    return results


def evaluate_harness(base_name: str, deliverable: Path, tasks: list[str | dict[str, Any]], *,
                     limit: int | None = None, include: str | Path | None = None, dtype: str = "auto",
                     batch_size: int = 8) -> dict[str, Any]:
    """Run `tasks` against the base model and against the tuned one (an adapter directory, or a full
    fine-tune's model directory): {"tasks", "limit", "base": {task: metrics}, "tuned": {...}}."""
    from tailor.adapters import read_adapter_config
    from tailor.models.load import resolve_model
    from tailor.serve.server import build_server

    tokenizer_dir = resolve_model(base_name).directory
    settings = dict(limit=limit, include=include, batch_size=batch_size)
    previous = {key: os.environ.get(key) for key in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)  # before datasets is first imported: it reads them once, at import
    try:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ValueError("--harness runs lm-evaluation-harness, which is not installed: "
                             f"{HARNESS_INSTALL}.") from None
        if (deliverable / "adapter_config.json").is_file():
            config = read_adapter_config(deliverable)
            rank = max([config.r, *config.rank_pattern.values()])
            app = build_server(base_name, str(deliverable.parent), max_loras=1, max_lora_rank=rank,
                               dtype=dtype, max_tokens=4096)
            app.state.engine.adapters.register(TUNED_NAME, deliverable.name)
            length = app.state.engine.max_model_len
            with serving(app) as url:
                base = run_lm_eval(url, app.state.config.model_name, tokenizer_dir, tasks,
                                   max_length=length, **settings)
                tuned = run_lm_eval(url, TUNED_NAME, tokenizer_dir, tasks, max_length=length, **settings)
        else:  # a full fine-tune: its own model, served after the base
            sides = []
            for name, tokenizer in ((base_name, tokenizer_dir), (str(deliverable), deliverable)):
                app = build_server(name, dtype=dtype, max_tokens=4096)
                with serving(app) as url:
                    sides.append(run_lm_eval(url, app.state.config.model_name, tokenizer, tasks,
                                             max_length=app.state.engine.max_model_len, **settings))
            base, tuned = sides
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {"tasks": task_names(tasks), "limit": limit, "base": base, "tuned": tuned}


def merge_into_eval_json(path: Path, harness: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """eval.json with its "harness" entry set (whatever else it holds is kept): the dict written."""
    from tailor.files import atomic_write_json

    current: dict[str, Any] = {}
    if path.is_file():
        try:
            current = json.loads(path.read_text())
        except ValueError:
            current = {}
    if not isinstance(current, dict):
        current = {}
    for key, value in extra.items():
        current.setdefault(key, value)
    current["harness"] = harness
    atomic_write_json(path, current)
    return current


__all__ = ["HARNESS_INSTALL", "evaluate_harness", "merge_into_eval_json", "parse_tasks", "run_lm_eval",
           "serving", "task_names"]
