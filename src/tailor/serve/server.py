"""`tailor serve`: an OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

Endpoints (OpenAI's shapes; the request's ``model`` picks the adapter, the base model's name means none):

  GET  /v1/models                  the base model, its adapters (``parent``: the base) and A/B routes
  POST /v1/completions             text in, text out; ``stream: true`` for server-sent events
  POST /v1/chat/completions        messages through the model's chat template; streaming too
  POST /v1/load_lora_adapter       {lora_name, lora_path?}: serve an adapter from under the root (admin)
  POST /v1/unload_lora_adapter     {lora_name} (admin)
  GET  /v1/routes, POST /v1/routes {name, targets}, DELETE /v1/routes/{name}   A/B routes (changes: admin)
  GET  /health, GET /metrics       liveness; Prometheus text

The server keeps no state but its adapter root and its routes, so replicas behind a load balancer can
share one adapter directory (README, "Serving").

The app is put together from routers, one per audience: the OpenAI API (`tailor.serve.openai_api`), the
admin API (`tailor.serve.admin`), health and metrics (`tailor.serve.metrics`), and the page's API
(`tailor.ui`, added by `tailor ui`); what they share (limits, keys, body reading, errors) is in
`tailor.serve.http`.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI

from tailor.routing import RoutingDescriptionError
from tailor.serve.adapters import UnknownAdapterError
from tailor.serve.admin import admin_router
from tailor.serve.auto import ContentRouter
from tailor.serve.engine import Engine
from tailor.serve.http import ServerConfig, add_error_handlers, authorize, read_json
from tailor.serve.metrics import ServerMetrics, metrics_router
from tailor.serve.openai_api import Completions, openai_router
from tailor.serve.routes import RouteError, Routes


def create_app(engine: Engine, config: ServerConfig, routes: Routes | None = None,
               metrics: ServerMetrics | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (whose thread the app starts and stops with itself)."""
    routes = routes or Routes()
    metrics = metrics or ServerMetrics()
    manager = engine.adapters
    if manager is not None:
        manager.listeners.append(metrics.on_adapter_event)
    engine.step_listeners.append(metrics.on_step)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="tailor", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.routes, app.state.metrics, app.state.config = engine, routes, metrics, config
    add_error_handlers(app, metrics)
    app.include_router(metrics_router(engine, metrics, config.model_name))
    app.include_router(openai_router(Completions(engine, config, routes, metrics)))
    app.include_router(admin_router(manager, config, routes))
    return app


def build_server(model: str | None = None, adapters: str | None = None, *, max_loras: int = 8,
                 max_lora_rank: int = 16, max_cpu_loras: int | None = None, max_batch: int = 32,
                 dtype: str = "auto", routes: list[str] | None = None, **limits) -> FastAPI:
    """Load the base model once and put an app around it (what `tailor serve` runs).

    Raises:
        ValueError (ModelNotFoundError, AdapterRefusedError, RouteError, ...): a bad model, adapter
            directory or route, before anything is served.
    """
    from tailor.models import DEFAULT_MODEL, load_model, parse_dtype
    from tailor.models.load import DEFAULT_MODEL_REPO, is_default_model
    from tailor.serve.adapters import AdapterManager
    from tailor.serve.routes import parse_route

    parsed = [parse_route(text) for text in routes or []]
    name = model or DEFAULT_MODEL
    base, tokenizer = load_model(name, dtype=parse_dtype(dtype))
    manager = AdapterManager(base, adapters, max_loras=max_loras, max_lora_rank=max_lora_rank,
                             max_cpu_loras=max_cpu_loras) if adapters is not None else None
    for route in parsed:
        for target, _ in route.targets:
            if manager is None:
                raise RouteError(f"route {route.name!r}: the server has no --adapters directory.")
            try:
                manager.path(target)
            except UnknownAdapterError:
                raise RouteError(f"route {route.name!r}: no adapter {target!r} under {adapters}.") from None
    engine = Engine(base, tokenizer, adapters=manager, max_batch=max_batch)
    check_routers(ContentRouter(base, tokenizer, manager), parsed)
    aliases = {str(base.name_or_path)}
    if is_default_model(name):
        aliases |= {DEFAULT_MODEL, DEFAULT_MODEL_REPO}
    config = ServerConfig(model_name=name, model_aliases=tuple(sorted(aliases - {name})), **limits)
    return create_app(engine, config, Routes(parsed))


def check_routers(router: ContentRouter, routes: list) -> None:
    """Refuse, before serving, a router by content whose adapters are not all described.

    Raises:
        RouteError: names the router, the adapters without a description and the fix.
    """
    for route in routes:
        if not route.auto:
            continue
        try:
            described = {d.name for d in router.candidates(route.adapters)}
        except RoutingDescriptionError as error:
            raise RouteError(f"route {route.name!r}: {error}") from None
        missing = [name for name in route.adapters if name not in described]
        if missing:
            raise RouteError(f"route {route.name!r} routes by content, but adapter(s) {', '.join(missing)} "
                             "carry no routing description; describe them (tailor adapters describe NAME "
                             "--examples FILE) or leave them out of the route.")


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


# ServerConfig, authorize and read_json live in tailor.serve.http; named here too, where they were first
__all__ = ["ServerConfig", "authorize", "build_server", "create_app", "read_json", "run_server"]
