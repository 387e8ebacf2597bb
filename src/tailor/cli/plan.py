"""`tailor plan` and `tailor advise`: what a run will cost before renting a machine, and which way of
adapting a model to take."""

from __future__ import annotations

import typer

from tailor.cli.app import app, fail
from tailor.cli.flags import dataclass_fields, with_flags
from tailor.plan.inputs import ALIASES, PlanInputs


@app.command("plan")
@with_flags(dataclass_fields(PlanInputs, ALIASES))
def plan_command(
    config: str | None = typer.Argument(
        None, help="a TrainConfig YAML (what `tailor train CONFIG` runs) to plan; flags override it"
    ),
    json_output: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    **inputs: object,
) -> None:
    """Estimate memory, fit, time and cost of fine-tuning a model, from its configuration alone. With
    CONFIG (a `tailor train` YAML) it plans that run; flags override the file. Every option is a field of
    plan's inputs (src/tailor/plan/inputs.py)."""
    import json

    from tailor.config import ConfigError
    from tailor.plan import PlanError
    from tailor.plan.inputs import plan_inputs, resolve_inputs
    from tailor.plan.render import render_plan

    try:
        resolved, tokens_basis = resolve_inputs(config, inputs)
        result = plan_inputs(resolved, tokens_basis)
    except (ConfigError, PlanError) as e:
        fail(e)
    if json_output:
        typer.echo(json.dumps(result, indent=2))
    else:
        render_plan(result)


def _default_model_name() -> str:
    from tailor.names import DEFAULT_MODEL

    return DEFAULT_MODEL


@app.command("advise")
def advise_command(
    prompting_works: bool | None = typer.Option(None, "--prompting-works/--prompting-fails"),
    few_shot_works: bool | None = typer.Option(None, "--few-shot-works/--few-shot-fails"),
    needs_actions: bool | None = typer.Option(None, "--needs-tools/--no-tools", help="gap: compute/act"),
    needs_knowledge: bool | None = typer.Option(None, "--needs-knowledge/--no-knowledge",
                                                help="gap is facts from documents"),
    examples: int | None = typer.Option(None, "--examples", help="labelled examples you have"),
    large_shift: bool | None = typer.Option(None, "--large-shift/--small-shift", help="far-off domain"),
    model: str = typer.Option(
        _default_model_name(), "--model", help="the model to train (catalogue name, config.json, .gguf, 7B)"
    ),
    gpu_memory_gb: float = typer.Option(24, "--gpu-memory", help="GB of GPU memory you have"),
    max_seq_len: int = typer.Option(1024, "--max-seq-len", "--seq-len", help="tokens per sequence"),
    out: str | None = typer.Option(
        None, "--out", help="write the recipe as a TrainConfig YAML: tailor train FILE --data ... runs it"
    ),
    json_output: bool = typer.Option(False, "--json"),
) -> None:
    """Prompting, few-shot, tools, retrieval, LoRA or full fine-tune? And a LoRA recipe that fits, in
    TrainConfig's field names (--out writes it as a config for `tailor train` and `tailor plan`)."""
    import json
    import sys

    from tailor.files import atomic_write_text
    from tailor.plan import AdviceInputs, PlanError, advise
    from tailor.plan.advise import QUESTIONS, recipe_yaml

    inputs = AdviceInputs(prompting_works, few_shot_works, needs_actions, needs_knowledge, examples,
                          large_shift, model, gpu_memory_gb, max_seq_len)
    if sys.stdin.isatty() and not json_output:
        for name, question in QUESTIONS.items():
            if getattr(inputs, name) is None:
                setattr(inputs, name, typer.confirm(question, default=False))
                if getattr(inputs, name) and name in ("prompting_works", "few_shot_works", "needs_actions",
                                                      "needs_knowledge"):
                    break
        if inputs.examples is None and not (inputs.prompting_works or inputs.few_shot_works
                                            or inputs.needs_actions or inputs.needs_knowledge):
            inputs.examples = typer.prompt("How many labelled examples do you have?", type=int, default=500)
    try:
        advice = advise(inputs)
    except PlanError as e:
        fail(e)
    result = advice.to_dict()
    if json_output:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(f"Escalation order: {' -> '.join(result['escalation_order'])}")
        typer.echo(f"Answer: {result['answer']}")
        for reason in result["reasons"]:
            typer.echo(f"  - {reason}")
        for item in result["assumed"]:
            typer.echo(f"  (not answered: {item})")
        if result["recipe"]:
            typer.echo("Starting recipe (TrainConfig fields):")
            for key, value in result["recipe"].items():
                typer.echo(f"  {key}: {value}")
            typer.echo(f"  (planned peak {result['planned_peak_gib']:.1f} GiB)")
    if out is None:
        return
    try:
        atomic_write_text(out, recipe_yaml(advice, inputs))
    except (PlanError, OSError) as e:
        fail(f"--out {out}: {e}")
    typer.echo(f"wrote the recipe to {out}: train it with `tailor train {out} --data YOUR_DATA.jsonl`, "
               f"plan it with `tailor plan {out}`", err=json_output)
