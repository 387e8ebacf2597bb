"""`tailor train`, `compare` and `sweep`: one run, several methods side by side, a grid of settings. Every
training knob is a flag generated from the training config (tailor.config), also settable in the YAML."""

from __future__ import annotations

from pathlib import Path

import typer

from tailor.cli.app import app, fail
from tailor.cli.flags import Field, field_docs, given, with_flags
from tailor.config import FIELD_SECTION, field_types
from tailor.config.sections import SECTIONS


def _config_fields() -> list[Field]:
    """One flag per training config field, under its flat name (the name the YAML uses)."""
    types = field_types()
    docs = {name: doc for cls in SECTIONS.values() for name, doc in field_docs(cls).items()}
    return [Field(name, types[name], docs.get(name, "")) for name in FIELD_SECTION]


def _train_fail(error: Exception, code: int = 2) -> None:
    """`fail`, and in one of several processes (torchrun) the error names the rank and is recorded for the
    launcher to report."""
    from tailor.train.distributed import launched_rank, launched_world_size

    message = str(error)
    if launched_world_size() > 1:
        from tailor.train.launch import record_failure

        record_failure(message)
        message = f"rank {launched_rank()}: {message}"
    fail(message, code)


def _parse_flag(name: str, value: object) -> object:
    """Flags that hold lists arrive as text: `q_proj,v_proj` and `0.9,0.95` (or YAML) become lists."""
    import yaml

    if isinstance(value, str) and name == "columns":  # prompt=question,completion=answer or YAML {...}
        if value.lstrip().startswith("{"):
            return yaml.safe_load(value)
        pairs = [part.split("=", 1) for part in value.split(",") if part.strip()]
        return {k.strip(): v.strip() for k, v in pairs} if all(len(p) == 2 for p in pairs) else value
    if not isinstance(value, str) or name not in ("target_modules", "adam_betas", "report_to"):
        return value
    if name in ("target_modules", "report_to") and "," not in value and not value.lstrip().startswith("["):
        return value
    parsed = yaml.safe_load(value if value.lstrip().startswith("[") else f"[{value}]")
    return [str(v).strip() if name in ("target_modules", "report_to") else v for v in parsed]


@app.command("train")
@with_flags(_config_fields())
def train_command(
    config: str | None = typer.Argument(None, help="YAML file of TrainConfig fields (flags override it)"),
    assignments: list[str] | None = typer.Option(None, "--set", help="FIELD=VALUE for any TrainConfig field"),
    nproc: int | None = typer.Option(None, "--nproc", min=1, help="training processes on this machine "
                                     "(torchrun; see --strategy); several machines: run torchrun directly"),
    **fields: object,
) -> None:
    """Fine-tune a model on a JSONL file (LoRA by default); writes a run directory. Every option is a
    field of the training config (src/tailor/config/sections.py), also settable in the YAML."""
    from tailor.config import parse_assignments
    from tailor.train import ConfigError, NonFiniteLossError, load_config, train
    from tailor.train.distributed import launched_rank, launched_world_size

    try:
        overrides = parse_assignments(assignments or [])
        overrides.update({k: _parse_flag(k, v) for k, v in given(fields).items()})
        resolved = load_config(config, **overrides)
        if nproc and nproc > 1:
            from tailor.train.run import check_before_training

            check_before_training(resolved)  # bad input stops here, before any process starts (exit 2)
            _launch_processes(nproc, config, overrides)
            return
        run_dir = train(resolved)
    except NonFiniteLossError as error:
        _train_fail(error, code=3)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        _train_fail(error)
    except Exception as error:  # a bug or a lost peer: the traceback prints; the launcher quotes the error
        if launched_world_size() > 1:
            from tailor.train.launch import record_failure

            record_failure(f"{type(error).__name__}: {error}")
        raise
    if launched_rank() == 0:
        typer.echo(f"run directory: {run_dir}")


def _launch_processes(nproc: int, config: str | None, overrides: dict) -> None:
    """`tailor train` in `nproc` processes (torchrun): the same config, the flags passed on as --set
    FIELD=VALUE (JSON is YAML, so every value reads back as it was)."""
    import json

    from tailor.train.launch import ProcessFailedError, launch

    arguments = [config] if config else []
    for name, value in overrides.items():
        arguments += ["--set", f"{name}={json.dumps(value)}"]
    try:
        launch(nproc, arguments)
    except ProcessFailedError as error:
        _train_fail(error, code=1)



def _compare_config(config: str | None, recipe_config: dict) -> dict:
    """TrainConfig values for every method of a comparison: the recipe's, then the YAML's; validated."""
    from tailor.config import load_config, read_yaml_config

    values = {**recipe_config, **(read_yaml_config(config) if config else {})}
    values.pop("out", None)
    load_config(**values)  # refuse a bad config before any method runs
    return values


def _default_eval_data(values: dict) -> str:
    data = str(values.get("data") or "")
    if data.startswith("builtin:") and data.count(":") == 1:
        return f"{data}:test"
    if values.get("val_data"):
        return str(values["val_data"])
    raise ValueError("no held-out data to compare on: give --eval-data FILE.jsonl (or val_data in the "
                     "config)")


@app.command("compare")
def compare_command(
    config: str | None = typer.Argument(None, help="training config YAML shared by every method"),
    methods: str | None = typer.Option(None, "--methods", help="comma list: zero-shot, few-shot, full, "
                                       "lora-r16, qlora-r16, qlora-int8-r16 ..."),
    recipe: str | None = typer.Option(None, "--recipe", help="a preset: demo (built-in data, 7 methods); "
                                      "tasks or tasks-quick (the methods on every built-in task)"),
    out: str = typer.Option("runs/compare", "--out", help="report directory"),
    eval_data: str | None = typer.Option(None, "--eval-data", help="held-out data (default: builtin test "
                                         "split, or the config's val_data)"),
    eval_n: int | None = typer.Option(None, "--eval-n", help="score only the first N held-out examples"),
    shots: int = typer.Option(3, "--shots", help="examples in the few-shot prompt"),
    full_lr: float | None = typer.Option(None, "--full-lr", help="lr of `full` (default: the method's)"),
    price_per_hour: float = typer.Option(1.0, "--price-per-hour", help="USD per hour of this machine"),
    margin: float = typer.Option(0.02, "--margin", help="quality margin of the decision (absolute)"),
    timeout: float | None = typer.Option(None, "--timeout", help="seconds per method before it is stopped"),
    safety: bool = typer.Option(False, "--safety", help="also each method's pass rates on the safety probes "
                                "(docs/safety.md; about a minute per method on 2 CPU cores)"),
) -> None:
    """LoRA vs QLoRA vs full fine-tuning vs prompting on your data: one table, one report, one decision."""
    from tailor.compare import parse_entries, run_compare
    from tailor.compare.presets import preset
    from tailor.config import ConfigError

    try:
        chosen = preset(recipe) if recipe else {}
        values = _compare_config(config, chosen.get("config", {}))
        if chosen.get("tasks"):
            _compare_tasks(values, chosen, methods, out, eval_n, shots, full_lr, price_per_hour, margin,
                           timeout)
            return
        if not (methods or chosen.get("methods")):
            raise ValueError("name the methods to compare (--methods lora-r16,full,...) or a --recipe")
        overrides = {k: dict(v) for k, v in chosen.get("method_overrides", {}).items()}
        if full_lr is not None:
            overrides.setdefault("full", {})["lr"] = full_lr
        elif "lr" in values and not recipe:  # the config's lr is an adapter's; full keeps its own default
            overrides.setdefault("full", {}).setdefault("lr", None)
        entries = parse_entries(methods or chosen["methods"], values, shots, overrides)
        held_out = eval_data or chosen.get("eval_data") or _default_eval_data(values)
        result = run_compare(values, entries, out, held_out, eval_n or chosen.get("eval_n"), price_per_hour,
                             margin, timeout, echo=typer.echo, safety=safety)
    except (ConfigError, ValueError) as error:
        fail(error)
    from tailor.report.compare import table_rows

    for cells in table_rows(result):
        typer.echo("  " + " | ".join(cells))
    decision = result["decision"]
    typer.echo(f"decision: {decision['reason'] if decision else 'no method produced a result'}")
    typer.echo(f"report: {out}/compare.html (compare.md, compare.json)")


def _compare_tasks(values: dict, chosen: dict, methods: str | None, out: str, eval_n: int | None, shots: int,
                   full_lr: float | None, price_per_hour: float, margin: float,
                   timeout: float | None) -> None:
    """`--recipe tasks`: the comparison on each built-in task, then the methods x tasks table."""
    from tailor.compare.tasks import run_task_compare
    from tailor.report.tasks import tasks_table

    overrides = {k: dict(v) for k, v in chosen.get("method_overrides", {}).items()}
    if full_lr is not None:
        overrides.setdefault("full", {})["lr"] = full_lr
    result = run_task_compare(values, methods or chosen["methods"], chosen["tasks"], out,
                              eval_n or chosen.get("eval_n"), shots, overrides, price_per_hour, margin,
                              timeout, echo=typer.echo)
    for cells in tasks_table(result, "quality"):
        typer.echo("  " + " | ".join(cells))
    for name, task in result["tasks"].items():
        typer.echo(f"decision on {name}: {task['decision']['reason'] if task['decision'] else 'no result'}")
    typer.echo(f"report: {out}/tasks.md (and {out}/TASK/compare.html per task)")


@app.command("sweep")
def sweep_command(
    config: str = typer.Argument(..., help="training config YAML (the fixed settings)"),
    grid: list[str] = typer.Option(..., "--grid", help="FIELD=V1,V2 (repeat per field): rank, lora_alpha, "
                                   "lr, lora_dropout, target_modules (names joined by ;) ..."),
    sample: int | None = typer.Option(None, "--sample", help="run a seeded random subset of N points"),
    out: str = typer.Option("runs/sweep", "--out", help="sweep directory"),
    timeout: float | None = typer.Option(None, "--timeout", help="seconds per run before it is stopped"),
) -> None:
    """Train a grid of settings, rank by validation loss, write the best as a ready-to-run config."""
    from tailor.compare.sweep import parse_grid, run_sweep
    from tailor.config import ConfigError

    try:
        values = _compare_config(config, {})
        result = run_sweep(values, parse_grid(grid), out, sample, timeout, echo=typer.echo)
    except (ConfigError, ValueError) as error:
        fail(error)
    typer.echo((Path(out) / "sweep.md").read_text())
    if result["best"] is None:
        raise typer.Exit(1)

