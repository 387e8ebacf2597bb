"""`tailor data ...`: the built-in tasks (tailor.data.tasks)."""

from __future__ import annotations

import typer

from tailor.cli.app import app

data_app = typer.Typer(help="The built-in tasks: generated data with an automatic metric.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("list")
def data_list(json_output: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Every built-in task: name, kind, split sizes, metric, description (use one as --data builtin:NAME)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from tailor.data.tasks import TASKS

    rows = [task.row() for task in TASKS.values()]
    if json_output:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="built-in tasks: --data builtin:NAME[:train|validation|test]")
    for column in ("name", "kind", "sizes (train/validation/test)", "metric", "description"):
        table.add_column(column, overflow="fold")
    for row in rows:
        sizes = "/".join(str(row["sizes"][split]) for split in ("train", "validation", "test"))
        table.add_row(row["name"], row["kind"], sizes, row["metric"], row["description"])
    Console().print(table)
