"""The `tailor` command line: one module per command group, each command a thin shell over a function of
the package. Importing a group registers its commands on the shared app (tailor.cli.app); the order here
is the order of `tailor --help`."""

from __future__ import annotations

# isort: off
from tailor.cli import train, demo, evaluate, plan, adapters, serve, data  # noqa: F401 - registers the commands
# isort: on
from tailor.cli.app import app


def main() -> None:
    """The `tailor` console script (pyproject's entry point)."""
    app()


__all__ = ["app", "main"]
