"""`tailor generate`, `chat` and `eval`: use a model, with or without an adapter."""

from __future__ import annotations

import typer

from tailor.cli.app import DTYPE_HELP, FORCE_HELP, MODEL_HELP, app, fail

JSON_SCHEMA_HELP = ("a JSON Schema file: the answer is JSON it accepts, enforced while generating "
                    "(structured output; needs pip install 'tailor[structured]')")


def _load_for_use(model_name: str | None, adapter: str | None, dtype: str, force: bool = False):
    """Model (+ adapter when given) and tokenizer; model defaults to the adapter's base, else the default.
    `adapter` may be a store reference (NAME@TAG)."""
    from tailor.adapters import load_adapter, read_adapter_config
    from tailor.adapters.store import locate
    from tailor.eval.run import adapter_base_model
    from tailor.models import DEFAULT_MODEL, load_model, parse_dtype

    if adapter:
        adapter = str(locate(adapter)[0])
        read_adapter_config(adapter)  # a wrong adapter path fails here, before the slow model load
    name = model_name or adapter_base_model(adapter) or DEFAULT_MODEL
    model, tokenizer = load_model(name, dtype=parse_dtype(dtype))
    if adapter:
        load_adapter(model, adapter, force=force)
    return model, tokenizer



@app.command("generate")
def generate_command(
    prompt: str = typer.Argument(..., help="the user message"),
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
    adapter: str | None = typer.Option(None, "--adapter", help="LoRA adapter directory (PEFT format)"),
    system: str | None = typer.Option(None, "--system", help="system prompt (default: the template's)"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    json_schema: str | None = typer.Option(None, "--json-schema", help=JSON_SCHEMA_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Answer one prompt (greedy) with the base model or with an adapter."""
    from tailor.eval import generate
    from tailor.serve.constraints import read_json_schema

    try:
        output = read_json_schema(json_schema) if json_schema else None  # before the model loads
        loaded, tokenizer = _load_for_use(model, adapter, dtype, force)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        typer.echo(generate(loaded, tokenizer, [messages], max_new_tokens=max_new_tokens, output=output)[0])
    except ValueError as error:
        fail(error)


@app.command("chat")
def chat_command(
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
    adapter: str | None = typer.Option(None, "--adapter", help="LoRA adapter directory (PEFT format)"),
    system: str | None = typer.Option(None, "--system", help="system prompt (default: the template's)"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Talk to the model line by line (stdin); the conversation is kept. /reset forgets it, /exit quits."""
    import sys

    from tailor.eval import generate

    try:
        loaded, tokenizer = _load_for_use(model, adapter, dtype, force)
    except ValueError as error:
        fail(error)
    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    if interactive:
        typer.echo("Type a message; /reset clears the conversation, /exit quits.")
    while True:
        if interactive:
            typer.echo("you> ", nl=False)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(start)
            continue
        history.append({"role": "user", "content": text})
        answer = generate(loaded, tokenizer, [history], max_new_tokens=max_new_tokens)[0]
        history.append({"role": "assistant", "content": answer})
        typer.echo(f"model> {answer}" if interactive else answer)


@app.command("eval")
def eval_command(
    run_dir: str | None = typer.Argument(None, help="run directory (its adapter/ or model/, config.yaml)"),
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP + " (default: the run's)"),
    adapter: str | None = typer.Option(None, "--adapter", help="adapter dir (default: RUN_DIR/adapter)"),
    data: str | None = typer.Option(None, "--data", help="held-out data: file or builtin spec (default: the "
                                    "test split of the run's built-in task, else builtin:support:test)"),
    n: int | None = typer.Option(None, "--n", help="score only the first N examples"),
    out: str | None = typer.Option(None, "--out", help="eval.json path (default: RUN_DIR/eval.json)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len", help="for val loss (default: the run's)"),
    retention: bool = typer.Option(True, "--retention/--no-retention", help="re-ask general prompts"),
    constrained: bool = typer.Option(False, "--constrained", help="also score the tuned model with the "
                                     "task's JSON Schema enforced (the built-in support task's, or "
                                     "--json-schema)"),
    json_schema: str | None = typer.Option(None, "--json-schema", help="the schema --constrained enforces "
                                           "(a JSON Schema file; implies --constrained)"),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    preferences: str | None = typer.Option(None, "--preferences", help="held-out preference pairs (file or "
                                           "builtin:support-prefs:test): preference accuracy, base vs tuned"),
    harness: str | None = typer.Option(
        None, "--harness", help="lm-evaluation-harness tasks instead (comma-separated names or task YAML "
        "files), scored through tailor serve; --n limits the examples per task, --batch-size the prompts "
        "per request; needs the [harness] extra"),
    harness_include: str | None = typer.Option(
        None, "--harness-include", help="a folder of lm-eval task YAMLs to find --harness names in"),
    safety: bool = typer.Option(
        False, "--safety", help="the safety probes instead (refusals, instructions, hallucination, brand "
        "voice, the run's canaries), base vs tuned -> eval.json's safety (docs/safety.md)"),
    probes: str | None = typer.Option(
        None, "--probes", help="with --safety: a probe JSONL file added to the built-in set (or a run's "
        "canaries.json: its secrets asked of this run)"),
    builtin_probes: bool = typer.Option(True, "--builtin-probes/--no-builtin-probes",
                                        help="with --safety: ask the built-in probes too"),
) -> None:
    """Base vs tuned on held-out data: task metrics, validation loss, capability retention -> eval.json."""
    from rich.console import Console

    from tailor.eval import evaluate_run, print_evaluation

    console = Console()
    if harness is not None:
        from tailor.eval import harness_run, render_harness

        try:
            console.print(f"lm-evaluation-harness {harness} on {run_dir or adapter}", highlight=False,
                          markup=False)
            result = harness_run(run_dir, tasks=harness, model=model, adapter=adapter, out=out, limit=n,
                                 include=harness_include, dtype=dtype, batch_size=batch_size)
        except ValueError as error:
            fail(error)
        console.print(render_harness(result))
        console.print(f"wrote {result['eval_json']}", highlight=False, markup=False)
        return
    if safety or probes:
        _safety_command(console, run_dir, model, adapter, probes, out, dtype, batch_size, builtin_probes)
        return
    try:
        console.print(f"evaluating {run_dir or adapter} on {data or 'its default held-out data'}",
                      highlight=False, markup=False)
        result = evaluate_run(run_dir, model=model, adapter=adapter, data=data, n=n, out=out,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, max_seq_len=max_seq_len,
                              retention=retention, dtype=dtype, preferences=preferences,
                              constrained=constrained, json_schema=json_schema)
    except ValueError as error:
        fail(error)
    print_evaluation(result, console)


def _safety_command(console, run_dir: str | None, model: str | None, adapter: str | None, probes: str | None,
                    out: str | None, dtype: str, batch_size: int, builtin: bool) -> None:
    from tailor.eval.render import render_safety
    from tailor.eval.safety_run import safety_run

    try:
        console.print(f"safety probes on {run_dir or adapter}, base vs tuned", highlight=False, markup=False)
        result = safety_run(run_dir, model=model, adapter=adapter, probes=probes, out=out, dtype=dtype,
                            batch_size=batch_size, builtin=builtin)
    except ValueError as error:
        fail(error)
    console.print(render_safety(result))
    console.print(f"wrote {result['eval_json']}", highlight=False, markup=False)
