"""What every command group shares: the Typer app they register on, the one error printer, and the help
strings several groups repeat (so that `--model` reads the same in generate, merge and serve)."""

from __future__ import annotations

from typing import NoReturn

import typer

app = typer.Typer(
    name="tailor",
    help="Adapt an open language model to your task on one machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MODEL_HELP = "local HF dir, cached repo id, .gguf, or the default model"
DTYPE_HELP = "auto (bf16 where the hardware has it) | float32 | bfloat16"
FORCE_HELP = "load the adapter even if it was trained on another base (its fingerprint differs)"
STORE_HELP = "adapter store directory (default: $TAILOR_ADAPTERS, else ~/.cache/tailor/adapters)"


def fail(error: Exception | str, code: int = 2) -> NoReturn:
    """Print one `error: ...` block on stderr (no traceback) and exit with `code`: the only way a command
    reports a problem the user can fix, so every command says it the same way. 2: bad input (click's code
    for usage errors), 1: the work itself failed, 3: training diverged."""
    from rich.console import Console
    from rich.markup import escape

    # escaped: a path such as runs/[exp1] must print as given (and "[/x]" must not raise a MarkupError)
    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, markup=True,
                               soft_wrap=True)
    raise typer.Exit(code)
