"""`tailor demo` and `tailor env`: the first two commands on a new machine (what it computes, then a
whole run on built-in data)."""

from __future__ import annotations

import typer

from tailor.cli.app import app, fail


@app.command("demo")
def demo_command(
    out: str = typer.Option("runs/demo", "--out", help="run directory (a previous demo there is replaced)"),
    max_steps: int | None = typer.Option(None, "--max-steps", help="override the recipe's step count"),
    eval_n: int | None = typer.Option(None, "--eval-n",
                                     help="held-out tickets to score (default all; 100 without native bf16)"),
) -> None:
    """Train on the built-in support-ticket dataset, then compare base vs tuned on held-out tickets."""
    from tailor.train import ConfigError, NonFiniteLossError
    from tailor.train.demo import run_demo

    try:
        run_demo(out, max_steps=max_steps, eval_n=eval_n)
    except NonFiniteLossError as error:
        fail(error, code=3)
    except (ConfigError, ValueError) as error:
        fail(error)



@app.command("env")
def env_command(
    json_output: bool = typer.Option(False, "--json", help="print one JSON object (and nothing else)"),
) -> None:
    """What to paste into a bug report, and what to expect here: versions, device, CPU capability and
    flags, native bf16, what precision auto runs, measured matmul GFLOPS (about 2 s), cache folders."""
    import json

    from tailor.environment import describe, format_report

    info = describe()
    if json_output:
        typer.echo(json.dumps(info, indent=2))
        return
    for line in format_report(info):
        typer.echo(line)

