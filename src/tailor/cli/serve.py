"""`tailor serve` and `tailor ui`: the OpenAI-compatible server, and the web page on top of it."""

from __future__ import annotations

import typer

from tailor.cli.app import DTYPE_HELP, MODEL_HELP, app, fail


@app.command("serve")
def serve_command(
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
    adapters: str | None = typer.Option(None, "--adapters", help="adapter root: each subdirectory is an "
                                        "adapter, served under its name"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="TAILOR_API_KEY",
                                       help="Bearer key for /v1/* (or $TAILOR_API_KEY)"),
    admin_key: str | None = typer.Option(None, "--admin-key", envvar="TAILOR_ADMIN_KEY",
                                         help="Bearer key enabling adapter load/unload and route changes"),
    max_loras: int = typer.Option(8, "--max-loras", help="adapter slots: adapters computed in one batch"),
    max_lora_rank: int = typer.Option(16, "--max-lora-rank", help="the largest adapter rank served"),
    max_cpu_loras: int | None = typer.Option(None, "--max-cpu-loras", help="adapters kept in host memory "
                                             "(default: --max-loras)"),
    route: list[str] | None = typer.Option(None, "--route", help="A/B route NAME=VERSION:WEIGHT,..., or a "
                                           "router by content NAME=auto:ADAPTER,... (repeat per route)"),
    max_batch: int = typer.Option(32, "--max-batch", help="requests computed together"),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="the largest max_tokens a request may ask"),
    max_prompt_tokens: int | None = typer.Option(None, "--max-prompt-tokens", help="longest prompt "
                                                 "(default: the model's context - 1)"),
    max_body_bytes: int = typer.Option(1_000_000, "--max-body-bytes", help="larger request bodies get 413"),
    max_queue: int = typer.Option(256, "--max-queue", help="waiting requests before 429"),
    timeout: float = typer.Option(600.0, "--timeout", help="seconds per request before 504"),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Serve the base model and its adapters with an OpenAI-compatible API (the request's `model`
    picks the adapter; `auto` lets the server choose by content); requests for different adapters are
    computed in one batch."""
    try:
        from tailor.serve.server import build_server, run_server

        server = build_server(model, adapters, max_loras=max_loras, max_lora_rank=max_lora_rank,
                              max_cpu_loras=max_cpu_loras, max_batch=max_batch, dtype=dtype, routes=route,
                              api_key=api_key, admin_key=admin_key, max_tokens=max_tokens,
                              max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes,
                              max_queue=max_queue, timeout=timeout)
    except ValueError as error:
        fail(error)
    run_server(server, host=host, port=port)


@app.command("ui")
def ui_command(
    runs: str = typer.Option(..., "--runs", help="the directory your runs are in (`tailor train --out`'s)"),
    adapters: str | None = typer.Option(None, "--adapters", help="adapter store (`tailor adapters`'s "
                                        "directory): listed, tagged and served in the playground"),
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="TAILOR_API_KEY",
                                       help="Bearer key for the API and the page's data"),
    admin_key: str | None = typer.Option(None, "--admin-key", envvar="TAILOR_ADMIN_KEY",
                                         help="Bearer key enabling tag changes and rollbacks from the page"),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """A web page for runs, comparisons, adapters, a side-by-side playground and the planner, served by
    the `tailor serve` app (its OpenAI-compatible API stays at /v1); open http://HOST:PORT/ui."""
    try:
        from tailor.serve.server import build_server, run_server
        from tailor.ui import RunIndex, add_ui

        index = RunIndex(runs)  # a wrong --runs is said before the model loads
        server = add_ui(build_server(model, adapters, dtype=dtype, api_key=api_key, admin_key=admin_key),
                        index, adapters)
    except ValueError as error:
        fail(error)
    typer.echo(f"tailor ui: http://{host}:{port}/ui")
    run_server(server, host=host, port=port)
