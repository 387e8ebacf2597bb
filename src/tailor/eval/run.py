"""Evaluate a run: its base model against what training delivered, on held-out data -> eval.json.

The one way to do it, used by `tailor eval` and by `tailor demo`. The run's method (tailor.methods) knows
how to put its deliverable on a freshly loaded base: an adapter is attached to the base itself (the base
side is then the same weights with the adapter switched off), a full fine-tune is loaded beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tailor.config import ConfigError, read_yaml_config
from tailor.eval.evaluate import compare_base_and_tuned, evaluate_constrained, write_eval_json
from tailor.names import RUN_CONFIG_NAME

DEFAULT_EVAL_DATA = "builtin:support:test"  # for a run not trained on a built-in task


def default_eval_data(run_config: dict[str, Any]) -> str:
    """The held-out data a run is scored on when none is named: the test split of the built-in task it
    trained on (`data: builtin:NAME`), else DEFAULT_EVAL_DATA."""
    from tailor.data.tasks import task_of_spec

    data = run_config.get("data")
    task = task_of_spec(data) if isinstance(data, str) else None
    return f"builtin:{task.name}:test" if task is not None else DEFAULT_EVAL_DATA


def evaluate_run(run_dir: str | Path | None = None, *, model: str | None = None,
                 adapter: str | Path | None = None, data: str | None = None, n: int | None = None,
                 out: str | Path | None = None,
                 max_new_tokens: int = 64, batch_size: int = 16, max_seq_len: int | None = None,
                 retention: bool = True, dtype: str = "auto", preferences: str | None = None,
                 constrained: bool = False, json_schema: str | Path | None = None,
                 safety: bool = False, probes: str | Path | None = None) -> dict[str, Any]:
    """Base vs tuned for `run_dir` (its config.yaml and adapter/ or model/), or for `adapter` alone, on
    `data` (default: `default_eval_data` of the run). On a built-in task's data (builtin:NAME[:SPLIT]),
    base and tuned also get the task's metric as `score` (tailor.data.tasks), and eval.json names the task.

    With `preferences` (held-out preference pairs: a file or builtin:support-prefs:test), also each side's
    preference accuracy (tailor.eval.preferences). `constrained` (or a `json_schema` file) also scores the
    tuned model with the task's JSON Schema enforced while it generates (structured output; the built-in
    support task's schema, or the file's): eval.json's "tuned_constrained". `safety` (or a `probes` file)
    also runs the safety probes, base vs tuned (tailor.eval.safety): eval.json's "safety".
    Writes eval.json (`out`, default run_dir/eval.json) and, for a run, refreshes its report.md.
    Returns the eval.json dict (see tailor.eval.compare_base_and_tuned) plus model, adapter and data.
    """
    from tailor.data import load_examples
    from tailor.data.tasks import task_of_spec
    from tailor.files import check_output_path  # a wrong --out fails before the evaluation, not after it
    from tailor.models import parse_dtype

    run, config, method, deliverable, base_name = _what_to_compare(run_dir, model, adapter)
    data = data or default_eval_data(config)
    task = task_of_spec(data)
    output = _output_format(data, constrained, json_schema)  # a bad schema fails before the model loads
    examples = load_examples(data)[: n if n else None]
    pairs = None
    if preferences:  # bad preference data stops here, before the model loads
        from tailor.data.preferences import load_preferences

        pairs = load_preferences(preferences)[: n if n else None]
    chosen_probes = None
    if safety or probes:  # a bad probe file stops here too
        from tailor.eval.safety import load_probes

        chosen_probes = load_probes(run, probes)
    settings = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, retention=retention,
                    max_seq_len=max_seq_len or int(config.get("max_seq_len") or 1024))
    target = check_output_path(Path(out) if out else (run / "eval.json" if run else Path("eval.json")))

    base, tokenizer = method.load_base(base_name, parse_dtype(dtype), config.get("device"))
    tuned = method.attach(base, deliverable)
    base.eval()
    tuned.eval()
    if output is not None:
        check_output_format(tuned, tokenizer, output)  # compiles for this tokenizer: before any generation
    result = compare_base_and_tuned(tuned, tokenizer, examples, **settings,
                                    base_model=None if tuned is base else base,
                                    task_score=task.score if task is not None else None)
    if task is not None:
        result["task"] = {"name": task.name, "metric": task.metric}
    if output is not None:
        result["tuned_constrained"] = evaluate_constrained(tuned, tokenizer, examples, output,
                                                           max_new_tokens, batch_size)
    result.update(model=base_name, adapter=str(deliverable), data=data)
    if pairs is not None:
        from tailor.eval.preferences import compare_preferences

        result["preferences"] = {"data": preferences, **compare_preferences(
            tuned, tokenizer, pairs, None if tuned is base else base, batch_size, settings["max_seq_len"])}

    if chosen_probes is not None:
        from tailor.eval.safety import default_voice_rules, evaluate_safety

        chosen, sources, skipped = chosen_probes
        result["safety"] = {"sources": sources, **evaluate_safety(
            tuned, tokenizer, chosen, None if tuned is base else base, default_voice_rules(),
            skipped=skipped)}

    write_eval_json(result, target)
    if run is not None and target.resolve() == (run / "eval.json").resolve():
        from tailor.report import write_report

        write_report(run)  # report.md picks up the new eval.json
        if config.get("report_to"):  # the run's experiment trackers get the evaluation too
            from tailor.trackers import log_evaluation

            log_evaluation(config["report_to"], run, result)
    result["eval_json"] = str(target)
    return result


def harness_run(run_dir: str | Path | None = None, *, tasks: str, model: str | None = None,
                adapter: str | Path | None = None, out: str | Path | None = None, limit: int | None = None,
                include: str | Path | None = None, dtype: str = "auto",
                batch_size: int = 8) -> dict[str, Any]:
    """lm-evaluation-harness `tasks` (tailor.eval.harness.parse_tasks), base vs tuned, through tailor's
    server; the result goes into eval.json's "harness" entry (`out`, default run_dir/eval.json; what else
    the file holds is kept) and, for a run, its report.md. Returns the harness entry plus eval_json."""
    from tailor.eval.harness import evaluate_harness, merge_into_eval_json, parse_tasks
    from tailor.files import check_output_path

    parsed = parse_tasks(tasks)  # bad task files fail before the model loads
    run, _, _, deliverable, base_name = _what_to_compare(run_dir, model, adapter)
    target = check_output_path(Path(out) if out else (run / "eval.json" if run else Path("eval.json")))
    harness = evaluate_harness(base_name, deliverable, parsed, limit=limit, include=include, dtype=dtype,
                               batch_size=batch_size)
    merge_into_eval_json(target, harness, {"model": base_name, "adapter": str(deliverable)})
    if run is not None and target.resolve() == (run / "eval.json").resolve():
        from tailor.report import write_report

        write_report(run)
    return {**harness, "eval_json": str(target)}


def _what_to_compare(run_dir: str | Path | None, model: str | None, adapter: str | Path | None):
    """(run directory or None, its config, its method, the deliverable directory, the base model's name)."""
    from tailor.methods import get_method
    from tailor.models import DEFAULT_MODEL

    run = Path(run_dir) if run_dir is not None else None
    config = _run_config(run) if run is not None else {}
    method = get_method(config.get("method", "lora") if adapter is None else "lora")
    deliverable = Path(adapter) if adapter is not None else method.deliverable_dir(run) if run else None
    if deliverable is None or not deliverable.is_dir():
        missing = deliverable if adapter is not None or run is None or run.is_dir() else run
        where = (f"{missing} {'is a file, not a directory' if missing.exists() else 'does not exist'}"
                 if missing else "no run directory or --adapter given")
        raise ValueError(f"nothing to compare: {where}; pass a run directory that holds adapter/ or model/, "
                         "or --adapter DIR.")
    base_name = model or config.get("model") or adapter_base_model(deliverable) or DEFAULT_MODEL
    return run, config, method, deliverable, base_name


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        return read_yaml_config(path)
    except ConfigError as error:
        raise ValueError(f"{path}: cannot read the run's config ({error}); evaluate with --model and "
                         "--adapter instead.") from None


def adapter_base_model(directory: str | Path | None) -> str | None:
    """The base model an adapter was trained on (adapter_config.json's base_model_name_or_path): the model
    to load under it when the user names none. None when there is no adapter or it does not say."""
    if not directory:
        return None
    try:
        config = json.loads((Path(directory) / "adapter_config.json").read_text())
        return config.get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def task_schema(data: str) -> dict[str, Any]:
    """The JSON Schema of a task's answers: the built-in support task's (tailor.data.support)."""
    if data.split(":")[:2] == ["builtin", "support"]:
        from tailor.data.support import support_schema

        return support_schema()
    raise ValueError(f"--constrained knows the JSON Schema of the built-in support task only, not of "
                     f"{data!r}: pass --json-schema FILE with the schema its answers follow.")


def _output_format(data: str, constrained: bool, json_schema: str | Path | None):
    from tailor.serve import constraints

    if json_schema is None and not constrained:
        return None
    if not constraints.structured_output_available():
        raise ValueError(f"a constrained evaluation needs the grammar engine: {constraints.INSTALL_HINT}.")
    if json_schema is not None:
        return constraints.read_json_schema(json_schema)
    return constraints.OutputFormat.json_schema(task_schema(data), "task")


def check_output_format(model, tokenizer, output) -> None:
    """Compile `output` for this model's tokenizer now (a schema the engine cannot enforce fails here)."""
    from tailor.serve.constraints import Constraints
    from tailor.serve.sampling import stop_token_ids

    vocab = getattr(model.get_output_embeddings(), "out_features", None) or model.config.vocab_size
    Constraints(tokenizer, vocab, frozenset(stop_token_ids(model, tokenizer))).compile(output)


__all__ = ["DEFAULT_EVAL_DATA", "adapter_base_model", "check_output_format", "default_eval_data",
           "evaluate_run", "harness_run", "task_schema"]
