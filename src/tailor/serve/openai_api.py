"""The OpenAI API's generation endpoints: /v1/models, /v1/completions and /v1/chat/completions.

Both endpoints turn their body into token prompts and hand them to one generation path (`Completions`):
the model name picks the adapter (resolved once into the reference the engine requests carry), each
prompt x n becomes an engine request, and the answer is awaited whole or streamed as server-sent events,
written by the one formatter (`tailor.serve.formatting.ResponseFormat`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tailor.routing import RoutingDescriptionError
from tailor.serve.adapters import AdapterManager, AdapterRef, AdapterRefusedError, UnknownAdapterError
from tailor.serve.auto import AUTO, ContentRouter, NoDescribedAdapterError, Routed
from tailor.serve.constraints import OutputFormat, StructuredOutputError, parse_response_format
from tailor.serve.engine import Engine
from tailor.serve.formatting import ResponseFormat, sse
from tailor.serve.http import ServerConfig, authorize, read_json
from tailor.serve.logprobs import LogprobsWriter, TokenTexts
from tailor.serve.metrics import ServerMetrics
from tailor.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    bad_request,
    model_not_found,
    parse,
)
from tailor.serve.request import Request as EngineRequest
from tailor.serve.routes import Routes
from tailor.serve.sampling import SamplingParams

MAX_CHOICES = 32  # completions per request (prompts x n)


@dataclass
class Job:
    """One engine request of an HTTP request (choice `index`), and the queue its text arrives on:
    (text, finished, the log-probabilities of the tokens since the last item)."""

    request: EngineRequest
    index: int
    queue: asyncio.Queue
    echo: str | None = None  # the prompt's text, returned before the completion's (completions' echo)
    logprobs_sent: int = 0  # entries of request.logprobs already queued (engine thread)


class Completions:
    """The generation path shared by completions and chat completions."""

    def __init__(self, engine: Engine, config: ServerConfig, routes: Routes, metrics: ServerMetrics) -> None:
        self.engine, self.config, self.routes, self.metrics = engine, config, routes, metrics
        self.manager: AdapterManager | None = engine.adapters
        self.max_prompt = min(config.max_prompt_tokens or engine.max_model_len - 1, engine.max_model_len - 1)
        self.token_texts = TokenTexts(engine.tokenizer)
        self.router = ContentRouter(engine.model, engine.tokenizer, engine.adapters)  # model "auto"

    async def answer(self, http: Request, body, prompts: list[list[int]], max_tokens: int | None,
                     chat: bool, echoes: list[str] | None = None):
        """Generate for `prompts` (each `body.n` times) and answer whole or as a stream (`echoes`: each
        prompt's text, returned before its completion)."""
        http.state.model = body.model
        for ids in prompts:
            self._check_prompt(ids)
        routed = await self._route(body.model, prompts)  # model "auto" or a router: chosen by content
        asked = body.model if routed is None else routed.adapter or self.config.model_name
        adapter, served = await self._resolve_model(asked, body.user)
        self._check_queue()
        output = await self._output_format(body.response_format)
        jobs = self._jobs(body, prompts, max_tokens, adapter, echoes)
        if output is not None:  # each choice its own grammar state (the grammar itself compiled once)
            for job in jobs:
                job.request.constraint = self.engine.constraints.row(output)
        try:
            for job in jobs:
                self.engine.submit(job.request)
        except UnknownAdapterError:
            self._abort(jobs)
            raise model_not_found(served) from None
        except ValueError as error:
            self._abort(jobs)
            raise bad_request(str(error)) from None
        top = logprobs_asked(body)
        form = ResponseFormat(chat, served, LogprobsWriter(self.token_texts, chat, top)
                              if top is not None else None)
        label = adapter.name if adapter is not None else ""
        headers = {"x-tailor-adapter": label}
        if routed is not None:  # how sure the router was: the closest adapter's distance / its radius
            headers["x-tailor-route-score"] = f"{routed.choice.score:.3f}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._events(jobs, form, include_usage, body.model, label)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        await self._wait(jobs)
        failed = next((j.request for j in jobs if j.request.finish_reason == "error"), None)
        if failed is not None:
            raise APIError(500, f"generation failed: {failed.error}", type="server_error")
        self._observe(body.model, label, jobs)
        return JSONResponse(form.response([(job.index, job.request) for job in jobs],
                                          {job.index: job.echo or "" for job in jobs}), headers=headers)

    # --- before generating ---------------------------------------------------------------------------
    async def _route(self, name: str, prompts: list[list[int]]) -> Routed | None:
        """For `model: "auto"` or a router by content, where the request goes (decided by its first
        prompt); None for any other model name. A 400 when no candidate adapter is described."""
        route = self.routes.get(name)
        if name != AUTO and (route is None or not route.auto):
            return None
        among = route.adapters if route is not None else None
        try:
            routed = await run_in_threadpool(self.router.route, name, prompts[0], among)
        except (NoDescribedAdapterError, RoutingDescriptionError) as error:
            raise bad_request(str(error), param="model", code="no_routing_description") from None
        except UnknownAdapterError as error:
            raise bad_request(f"router {name!r} names adapter {error.args[0]!r}, which this server does not "
                              "serve.", param="model") from None
        self.metrics.on_auto_route(routed)
        return routed

    async def _resolve_model(self, name: str, user: str | None) -> tuple[AdapterRef | None, str]:
        """(the adapter, resolved once, or None for the base; the name that serves: a route's version)."""
        config = self.config
        if name == config.model_name or name in config.model_aliases:
            return None, config.model_name
        route = self.routes.get(name)
        if route is not None and not route.auto:
            name = route.choose(user)
            self.metrics.routed.labels(route.name, name).inc()
        if self.manager is None:
            raise model_not_found(name)
        try:
            ref = await run_in_threadpool(self.manager.resolve, name)
            await run_in_threadpool(self.manager.ensure, ref)  # read from disk now: its errors are ours
        except UnknownAdapterError:
            raise model_not_found(name) from None
        except AdapterRefusedError as error:
            raise bad_request(str(error), param="model", code="adapter_refused") from None
        return ref, name

    async def _output_format(self, response_format: dict | None) -> OutputFormat | None:
        """The answer's required format, its grammar compiled (off the event loop; cached per schema);
        a 400 naming the problem for a bad response_format or a schema that cannot be enforced."""
        try:
            output = parse_response_format(response_format)
            if output is not None:
                await run_in_threadpool(self.engine.constraints.compile, output)
        except StructuredOutputError as error:
            raise bad_request(f"Invalid response_format: {error}", param="response_format") from None
        return output

    def _check_queue(self) -> None:
        waiting = len(self.engine.waiting)
        if waiting >= self.config.max_queue:
            raise APIError(429, f"The server is busy ({waiting} requests waiting); retry shortly.",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise bad_request("The prompt is empty.", param="prompt")
        if len(ids) > self.max_prompt:
            raise bad_request(f"The prompt has {len(ids)} tokens; this server takes at most "
                              f"{self.max_prompt}.", param="prompt", code="context_length_exceeded")
        vocab = len(self.engine.tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise bad_request(f"The prompt holds token ids outside [0, {vocab}).", param="prompt")

    def _sampling(self, body, max_tokens: int | None, prompt_len: int, seed_offset: int) -> SamplingParams:
        limit, context = self.config.max_tokens, self.engine.max_model_len
        room = context - prompt_len
        if max_tokens is None:
            max_tokens = min(limit, room)
        if body.min_tokens > max_tokens:
            raise bad_request(f"min_tokens={body.min_tokens} is above max_tokens={max_tokens}.",
                              param="min_tokens")
        if max_tokens > limit:
            raise bad_request(f"max_tokens={max_tokens} is above this server's limit of {limit}.",
                              param="max_tokens")
        if max_tokens > room:
            raise bad_request(f"This model's context length is {context} tokens; the prompt has "
                              f"{prompt_len}, so max_tokens can be at most {room} (asked: {max_tokens}).",
                              param="max_tokens", code="context_length_exceeded")
        seed = body.seed + seed_offset if body.seed is not None else None
        vocab = self.engine.vocab_size
        if any(not 0 <= t < vocab for t in body.stop_token_ids or ()):
            raise bad_request(f"stop_token_ids must be token ids in [0, {vocab}).", param="stop_token_ids")
        top = logprobs_asked(body)
        echo_logprobs = top if getattr(body, "echo", False) else None
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              stop=tuple(body.stop or ()), seed=seed, ignore_eos=body.ignore_eos,
                              top_k=body.top_k, min_tokens=body.min_tokens,
                              stop_token_ids=tuple(body.stop_token_ids or ()),
                              repetition_penalty=body.repetition_penalty, logprobs=top,
                              prompt_logprobs=echo_logprobs)

    def _jobs(self, body, prompts: list[list[int]], max_tokens: int | None,
              adapter: AdapterRef | None, echoes: list[str] | None) -> list[Job]:
        loop = asyncio.get_running_loop()
        jobs = []
        for p, ids in enumerate(prompts):
            for k in range(body.n):
                index = p * body.n + k
                params = self._sampling(body, max_tokens, len(ids), index)
                job = Job(None, index, asyncio.Queue(), echoes[p] if echoes else None)

                def push(request, delta, job=job):  # engine thread: the new log-probabilities go along
                    entries = request.logprobs[job.logprobs_sent :]
                    job.logprobs_sent += len(entries)
                    loop.call_soon_threadsafe(job.queue.put_nowait, (delta, request.finished, entries))

                def done(request, job=job):
                    loop.call_soon_threadsafe(job.queue.put_nowait, ("", True, []))

                job.request = (EngineRequest(ids, params, adapter, on_update=push) if body.stream
                               else EngineRequest(ids, params, adapter, on_finish=done))
                jobs.append(job)
        return jobs

    # --- while generating ----------------------------------------------------------------------------
    async def _wait(self, jobs: list[Job]) -> None:
        """Until every job finished (504 past the timeout; the requests stopped if the client leaves)."""
        deadline = time.monotonic() + self.config.timeout
        try:
            for job in jobs:
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    _, finished, _ = await asyncio.wait_for(job.queue.get(), remaining)
                    if finished:
                        break
        except (TimeoutError, asyncio.TimeoutError):
            self._abort(jobs)
            raise self._timeout() from None
        except asyncio.CancelledError:
            self._abort(jobs)
            raise

    async def _events(self, jobs: list[Job], form: ResponseFormat, include_usage: bool, model: str,
                      label: str) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece of text, a last chunk per choice with its finish_reason
        (and the usage), an optional usage-only chunk, then [DONE]. Stops the requests if the client
        leaves."""
        deadline = time.monotonic() + self.config.timeout
        merged: asyncio.Queue = asyncio.Queue()

        async def forward(job: Job) -> None:
            while True:
                delta, finished, entries = await job.queue.get()
                await merged.put((job, delta, finished, entries))
                if finished:
                    return

        tasks = [asyncio.create_task(forward(job)) for job in jobs]
        open_jobs = len(jobs)
        try:
            for chunk in form.opening([job.index for job in jobs]):
                yield sse(chunk)
            while open_jobs:
                remaining = deadline - time.monotonic()
                try:
                    item = await asyncio.wait_for(merged.get(), max(remaining, 0.001))
                except (TimeoutError, asyncio.TimeoutError):
                    self._abort(jobs)
                    yield sse(self._timeout().body())
                    break
                job, delta, finished, entries = item
                if job.echo is not None:  # the prompt comes first, with its log-probabilities
                    delta, job.echo = job.echo + delta, None
                    entries = (job.request.prompt_logprobs or []) + entries
                if delta or entries:
                    yield sse(form.piece(job.index, delta, entries))
                if finished:
                    open_jobs -= 1
                    request = job.request
                    if request.finish_reason == "error":
                        failure = APIError(500, f"generation failed: {request.error}", type="server_error")
                        yield sse(failure.body())
                        self._abort(jobs)
                        break
                    yield sse(form.last(job.index, request))
            else:
                self._observe(model, label, jobs)
                if include_usage:
                    yield sse(form.usage_chunk([job.request for job in jobs]))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): stop what still runs
            self._abort([j for j in jobs if not j.request.finished])
            for task in tasks:
                task.cancel()

    def _timeout(self) -> APIError:
        seconds = self.config.timeout
        return APIError(504, f"The request took longer than the server's timeout ({seconds:g} s).",
                        type="timeout_error", code="timeout")

    def _abort(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.engine.abort(job.request)

    def _observe(self, model: str, label: str, jobs: list[Job]) -> None:
        """Count an answered request and its per-choice latency, time to first token and tokens."""
        metrics = self.metrics
        metrics.requests.labels(model, label, "200").inc()
        for job in jobs:
            request = job.request
            end = request.finished_at or time.perf_counter()
            metrics.latency.labels(label).observe(end - request.arrived)
            if request.first_token_at is not None:
                metrics.ttft.labels(label).observe(request.first_token_at - request.arrived)
            metrics.prompt_tokens.labels(label).inc(len(request.prompt_ids))
            metrics.generated_tokens.labels(label).inc(request.generated)


def openai_router(completions: Completions) -> APIRouter:
    """GET /v1/models, POST /v1/completions, POST /v1/chat/completions."""
    router = APIRouter()
    engine, config, routes = completions.engine, completions.config, completions.routes
    manager = completions.manager

    @router.get("/v1/models")
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

    @router.post("/v1/completions")
    async def text_completions(request: Request):
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
        if len(prompts) * body.n > MAX_CHOICES:
            raise bad_request(f"At most {MAX_CHOICES} completions per request (prompts x n).", param="prompt")
        echoes = None
        if body.echo:  # the prompt as given; token ids as their text
            given = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt[0], str) else None
            echoes = given or [engine.tokenizer.decode(ids) for ids in prompts]
        return await completions.answer(request, body, prompts, body.max_tokens, chat=False, echoes=echoes)

    @router.post("/v1/chat/completions")
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
        return await completions.answer(request, body, [ids], max_tokens, chat=True)

    return router


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def logprobs_asked(body) -> int | None:
    """How many most likely tokens to report per position, or None when no log-probabilities are asked
    for (completions: `logprobs` N; chat: `logprobs` true with `top_logprobs` N, default 0)."""
    if isinstance(body, ChatRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


__all__ = ["Completions", "Job", "openai_router"]
