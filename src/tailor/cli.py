"""The `tailor` command line. Each command is a thin shell over a function of the package."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="tailor",
    help="Adapt an open language model to your task on one machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# --- train / demo (owner: train) ----------------------------------------------------------------------

# --- end train / demo ---

# --- eval / generate / chat (owner: models-eval) -------------------------------------------------------

# --- end eval / generate / chat ---

# --- plan / advise (owner: plan) -----------------------------------------------------------------------

# --- end plan / advise ---


def main() -> None:
    app()


if __name__ == "__main__":
    main()
