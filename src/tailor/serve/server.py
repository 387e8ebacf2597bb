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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tailor.serve.adapters import AdapterRefusedError, UnknownAdapterError
from tailor.serve.engine import Engine
from tailor.serve.engine import Request as EngineRequest
from tailor.serve.metrics import ServerMetrics
from tailor.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    bad_request,
    model_not_found,
    parse,
)
from tailor.serve.routes import RouteError, Routes, parse_targets
from tailor.serve.sampling import SamplingParams


@dataclass
class ServerConfig:
    """What the server allows; every limit is answered with an OpenAI-shaped error, never a 500."""

    model_name: str  # the base model's id in the API
    model_aliases: tuple[str, ...] = ()  # other names that mean the base model (its hub id, its path)
    api_key: str | None = None  # Bearer key for /v1/* (None: open)
    admin_key: str | None = None  # Bearer key for loading/unloading adapters and changing routes (None: off)
    max_tokens: int = 2048  # the largest max_tokens a request may ask for
    max_prompt_tokens: int | None = None  # default: the model's context length - 1
    max_body_bytes: int = 1_000_000  # larger request bodies get 413
    max_queue: int = 256  # requests waiting to start; beyond, 429 with Retry-After
    timeout: float = 600.0  # seconds a request may take (answer 504 and stop it)


@dataclass
class _Job:
    """One engine request of an HTTP request, and the queue its text arrives on."""

    request: EngineRequest
    index: int
    queue: asyncio.Queue


def create_app(engine: Engine, config: ServerConfig, routes: Routes | None = None,
               metrics: ServerMetrics | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (whose thread the app starts and stops with itself)."""
    routes = routes or Routes()
    metrics = metrics or ServerMetrics()
    manager = engine.adapters
    if manager is not None:
        manager.listeners.append(metrics.on_adapter_event)
    engine.step_listeners.append(metrics.on_step)
    max_prompt = min(config.max_prompt_tokens or engine.max_model_len - 1, engine.max_model_len - 1)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="tailor", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.routes, app.state.metrics, app.state.config = engine, routes, metrics, config

    # --- errors ----------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        metrics.requests.labels(_requested_model(request), "", str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(error.status_code, str(error.detail), type=kind).body(),
                            status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(bad_request(str(error)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        body = APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    # --- helpers -------------------------------------------------------------------------------------
    async def resolve_model(name: str, user: str | None) -> tuple[str | None, str]:
        """(adapter to use or None for the base, the name that serves: the version for a route)."""
        if name == config.model_name or name in config.model_aliases:
            return None, config.model_name
        route = routes.get(name)
        if route is not None:
            name = route.choose(user)
            metrics.routed.labels(route.name, name).inc()
        if manager is None:
            raise model_not_found(name)
        try:
            await run_in_threadpool(manager.ensure, name)  # read from disk now: its errors are this request's
        except UnknownAdapterError:
            raise model_not_found(name) from None
        except AdapterRefusedError as error:
            raise bad_request(str(error), param="model", code="adapter_refused") from None
        return name, name

    def check_queue() -> None:
        if len(engine.waiting) >= config.max_queue:
            waiting = len(engine.waiting)
            raise APIError(429, f"The server is busy ({waiting} requests waiting); retry shortly.",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    def sampling(body, max_tokens: int | None, prompt_len: int, seed_offset: int) -> SamplingParams:
        room = engine.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = min(config.max_tokens, room)
        if max_tokens > config.max_tokens:
            raise bad_request(f"max_tokens={max_tokens} is above this server's limit of {config.max_tokens}.",
                              param="max_tokens")
        if max_tokens > room:
            raise bad_request(f"This model's context length is {engine.max_model_len} tokens; the prompt has "
                              f"{prompt_len}, so max_tokens can be at most {room} (asked: {max_tokens}).",
                              param="max_tokens", code="context_length_exceeded")
        seed = body.seed + seed_offset if body.seed is not None else None
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              stop=tuple(body.stop or ()), seed=seed)

    def check_prompt(ids: list[int]) -> None:
        if not ids:
            raise bad_request("The prompt is empty.", param="prompt")
        if len(ids) > max_prompt:
            raise bad_request(f"The prompt has {len(ids)} tokens; this server takes at most {max_prompt}.",
                              param="prompt", code="context_length_exceeded")
        vocab = len(engine.tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise bad_request(f"The prompt holds token ids outside [0, {vocab}).", param="prompt")

    async def run(http: Request, body, prompts: list[list[int]], max_tokens: int | None, chat: bool):
        adapter, served = await resolve_model(body.model, body.user)
        http.state.model = body.model
        for ids in prompts:
            check_prompt(ids)
        check_queue()
        loop = asyncio.get_running_loop()
        jobs: list[_Job] = []
        for p, ids in enumerate(prompts):
            for k in range(body.n):
                index = p * body.n + k
                params = sampling(body, max_tokens, len(ids), index)
                queue: asyncio.Queue = asyncio.Queue()

                def push(request, delta, queue=queue):
                    loop.call_soon_threadsafe(queue.put_nowait, (delta, request.finished))

                def done(request, queue=queue):
                    loop.call_soon_threadsafe(queue.put_nowait, ("", True))

                engine_request = (EngineRequest(ids, params, adapter, on_update=push) if body.stream
                                  else EngineRequest(ids, params, adapter, on_finish=done))
                jobs.append(_Job(engine_request, index, queue))
        try:
            for job in jobs:
                engine.submit(job.request)
        except UnknownAdapterError:
            _abort(engine, jobs)
            raise model_not_found(served) from None
        except ValueError as error:
            _abort(engine, jobs)
            raise bad_request(str(error)) from None
        kind = "chat.completion" if chat else "text_completion"
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        headers = {"x-tailor-adapter": served if adapter is not None else ""}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(engine, jobs, response_id, kind, served, chat, include_usage, config.timeout, metrics,
                        body.model, adapter),
                media_type="text/event-stream", headers=headers)
        deadline = time.monotonic() + config.timeout
        try:
            for job in jobs:
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    _, finished = await asyncio.wait_for(job.queue.get(), remaining)
                    if finished:
                        break
        except (TimeoutError, asyncio.TimeoutError):
            _abort(engine, jobs)
            raise APIError(504, f"The request took longer than the server's timeout ({config.timeout:g} s).",
                           type="timeout_error", code="timeout") from None
        except asyncio.CancelledError:
            _abort(engine, jobs)
            raise
        failed = next((j.request for j in jobs if j.request.finish_reason == "error"), None)
        if failed is not None:
            raise APIError(500, f"generation failed: {failed.error}", type="server_error")
        _observe(metrics, body.model, adapter, jobs)
        choices = [_choice(job, chat) for job in jobs]
        payload = {"id": response_id, "object": kind, "created": int(time.time()), "model": served,
                   "choices": choices, "usage": _usage(jobs), "system_fingerprint": None}
        return JSONResponse(payload, headers=headers)

    # --- endpoints -----------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": config.model_name, "running": len(engine.running),
                "waiting": len(engine.waiting)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_depth.set(len(engine.waiting))
        metrics.running.set(len(engine.running))
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request, config)
        created = int(time.time())
        data = [{"id": config.model_name, "object": "model", "created": created, "owned_by": "tailor",
                 "root": config.model_name, "parent": None}]
        names = await run_in_threadpool(manager.names) if manager is not None else []
        for name in names:
            data.append({"id": name, "object": "model", "created": created, "owned_by": "tailor",
                         "root": name, "parent": config.model_name})
        for route in routes.all():
            data.append({"id": route.name, "object": "model", "created": created, "owned_by": "tailor",
                         "root": route.name, "parent": config.model_name, "route": route.spec()})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request, config)
        body = parse(CompletionRequest, await read_json(request, config.max_body_bytes))
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [_encode(engine.tokenizer, prompt)]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = [_encode(engine.tokenizer, p) for p in prompt]
        elif prompt and all(isinstance(p, list) for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            raise bad_request("prompt must be a string, a list of strings, or token ids.", param="prompt")
        if len(prompts) * body.n > 32:
            raise bad_request("At most 32 completions per request (prompts x n).", param="prompt")
        return await run(request, body, prompts, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request, config)
        body = parse(ChatRequest, await read_json(request, config.max_body_bytes))
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            from tailor.data.tokenize import render_chat

            text = render_chat(engine.tokenizer, messages, add_generation_prompt=True)
        except Exception as error:  # jinja errors: roles out of order, a template that raises
            raise bad_request(f"The chat template cannot render these messages: {error}.",
                              param="messages") from None
        ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await run(request, body, [ids], max_tokens, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> dict:
        authorize(request, config, admin=True)
        data = await read_json(request, config.max_body_bytes)
        name = data.get("lora_name") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name:
            raise bad_request("Give lora_name (and optionally lora_path, under the adapter root).",
                              param="lora_name")
        if manager is None:
            raise bad_request("This server serves no adapters.")
        path = data.get("lora_path")
        try:
            adapter = await run_in_threadpool(manager.load, name, path)
        except UnknownAdapterError:
            raise APIError(404, f"No adapter {name!r} under the adapter root (lora_path={path!r}).",
                           param="lora_path", code="adapter_not_found") from None
        except AdapterRefusedError as error:
            raise bad_request(str(error), param="lora_path", code="adapter_refused") from None
        return {"object": "adapter", "id": name, "status": "loaded", "rank": adapter.rank,
                "load_ms": round(adapter.load_ms, 2)}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> dict:
        authorize(request, config, admin=True)
        data = await read_json(request, config.max_body_bytes)
        name = data.get("lora_name") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name or manager is None:
            raise bad_request("Give lora_name.", param="lora_name")
        try:
            await run_in_threadpool(manager.unregister, name)
        except UnknownAdapterError:
            raise model_not_found(name) from None
        except AdapterRefusedError as error:
            raise bad_request(str(error), param="lora_name") from None
        return {"object": "adapter", "id": name, "status": "unloaded"}

    @app.get("/v1/routes")
    async def list_routes(request: Request) -> dict:
        authorize(request, config)
        data = [{"name": r.name, "targets": dict(r.targets)} for r in routes.all()]
        return {"object": "list", "data": data}

    @app.post("/v1/routes")
    async def set_route(request: Request) -> dict:
        authorize(request, config, admin=True)
        data = await read_json(request, config.max_body_bytes)
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise bad_request('Give {"name": ROUTE, "targets": "v1:0.9,v2:0.1" or {"v1": 0.9, ...}}.',
                              param="name")
        targets = data.get("targets")
        if isinstance(targets, dict):
            targets = ",".join(f"{k}:{v}" for k, v in targets.items())
        if not isinstance(targets, str):
            raise bad_request("targets must be 'v1:0.9,v2:0.1' or an object of weights.", param="targets")
        try:
            route = parse_targets(data["name"], targets)
        except RouteError as error:
            raise bad_request(str(error), param="targets") from None
        if route.name == config.model_name:
            raise bad_request("A route cannot take the base model's name.", param="name")
        for target, _ in route.targets:
            await _check_adapter(manager, target)
        routes.set(route)
        return {"name": route.name, "targets": dict(route.targets)}

    @app.delete("/v1/routes/{name}")
    async def delete_route(name: str, request: Request) -> dict:
        authorize(request, config, admin=True)
        if not routes.delete(name):
            raise APIError(404, f"No route {name!r}.", param="name", code="route_not_found")
        return {"name": name, "deleted": True}

    return app


def authorize(request: Request, config: ServerConfig, admin: bool = False) -> None:
    """Check the request's Bearer key: the API key (or the admin key) for reads, the admin key for changes.

    Raises:
        APIError: 401 for a missing or wrong key; 403 for a change when the server has no admin key.
    """
    if admin:
        if not config.admin_key:
            raise APIError(403, "Adapter and route changes are disabled: start the server with "
                           "--admin-key to enable them.", type="permission_error", code="admin_disabled")
        keys = [config.admin_key]
    else:
        if not config.api_key:
            return
        keys = [k for k in (config.api_key, config.admin_key) if k]
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not any(secrets.compare_digest(given.strip(), k) for k in keys):
        what = "admin key" if admin else "API key"
        raise APIError(401, f"Missing or wrong {what}: send 'Authorization: Bearer <key>'.",
                       type="authentication_error", code="invalid_api_key")


async def read_json(request: Request, limit: int) -> object:
    """The request's JSON body, read up to `limit` bytes (413 beyond, 400 for JSON that does not parse)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise bad_request(f"The request body is not valid JSON: {error}.") from None


# --- pieces -------------------------------------------------------------------------------------------
def _requested_model(request: Request) -> str:
    return getattr(request.state, "model", "") or ""


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                    code="request_too_large")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


async def _check_adapter(manager, name: str) -> None:
    if manager is None:
        raise model_not_found(name)
    try:
        await run_in_threadpool(manager.path, name)
    except UnknownAdapterError:
        raise bad_request(f"Route version {name!r} is not an adapter of this server.", param="targets",
                          code="model_not_found") from None
    except AdapterRefusedError as error:
        raise bad_request(str(error), param="targets") from None


def _abort(engine: Engine, jobs: list[_Job]) -> None:
    for job in jobs:
        engine.abort(job.request)


def _finish_reason(request: EngineRequest) -> str:
    return "length" if request.finish_reason == "length" else "stop"


def _choice(job: _Job, chat: bool) -> dict:
    request = job.request
    if chat:
        return {"index": job.index, "message": {"role": "assistant", "content": request.text},
                "logprobs": None, "finish_reason": _finish_reason(request)}
    return {"index": job.index, "text": request.text, "logprobs": None,
            "finish_reason": _finish_reason(request)}


def _usage(jobs: list[_Job]) -> dict:
    prompt = sum(len(job.request.prompt_ids) for job in jobs)
    completion = sum(job.request.generated for job in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _observe(metrics: ServerMetrics, model: str, adapter: str | None, jobs: list[_Job]) -> None:
    label = adapter or ""
    metrics.requests.labels(model, label, "200").inc()
    for job in jobs:
        request = job.request
        end = request.finished_at or time.perf_counter()
        metrics.latency.labels(label).observe(end - request.arrived)
        if request.first_token_at is not None:
            metrics.ttft.labels(label).observe(request.first_token_at - request.arrived)
        metrics.prompt_tokens.labels(label).inc(len(request.prompt_ids))
        metrics.generated_tokens.labels(label).inc(request.generated)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _stream(engine: Engine, jobs: list[_Job], response_id: str, kind: str, served: str, chat: bool,
                  include_usage: bool, timeout: float, metrics: ServerMetrics, model: str,
                  adapter: str | None) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, a last chunk per choice with its finish_reason
    (and the usage), an optional usage-only chunk, then [DONE]. Stops the requests if the client leaves."""
    created = int(time.time())
    chunk_kind = "chat.completion.chunk" if chat else kind
    deadline = time.monotonic() + timeout

    def chunk(index: int, text: str | None, finish: str | None, first: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": response_id, "object": chunk_kind, "created": created, "model": served,
                "choices": [choice]}

    merged: asyncio.Queue = asyncio.Queue()

    async def forward(job: _Job) -> None:
        while True:
            delta, finished = await job.queue.get()
            await merged.put((job, delta, finished))
            if finished:
                return

    tasks = [asyncio.create_task(forward(job)) for job in jobs]
    open_jobs = len(jobs)
    try:
        if chat:
            for job in jobs:
                yield _sse(chunk(job.index, None, None, first=True))
        while open_jobs:
            remaining = deadline - time.monotonic()
            try:
                job, delta, finished = await asyncio.wait_for(merged.get(), max(remaining, 0.001))
            except (TimeoutError, asyncio.TimeoutError):
                _abort(engine, jobs)
                error = APIError(504, f"The request took longer than the server's timeout ({timeout:g} s).",
                                 type="timeout_error", code="timeout")
                yield _sse(error.body())
                break
            if delta:
                yield _sse(chunk(job.index, delta, None))
            if finished:
                open_jobs -= 1
                request = job.request
                if request.finish_reason == "error":
                    failure = APIError(500, f"generation failed: {request.error}", type="server_error")
                    yield _sse(failure.body())
                    _abort(engine, jobs)
                    break
                last = chunk(job.index, None, _finish_reason(request))
                last["usage"] = _usage([job])
                yield _sse(last)
        else:
            _observe(metrics, model, adapter, jobs)
            if include_usage:
                yield _sse({"id": response_id, "object": chunk_kind, "created": created, "model": served,
                            "choices": [], "usage": _usage(jobs)})
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): stop what still runs
        _abort(engine, [j for j in jobs if not j.request.finished])
        for task in tasks:
            task.cancel()


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
    aliases = {str(base.name_or_path)}
    if is_default_model(name):
        aliases |= {DEFAULT_MODEL, DEFAULT_MODEL_REPO}
    config = ServerConfig(model_name=name, model_aliases=tuple(sorted(aliases - {name})), **limits)
    return create_app(engine, config, Routes(parsed))


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["ServerConfig", "authorize", "build_server", "create_app", "read_json", "run_server"]
