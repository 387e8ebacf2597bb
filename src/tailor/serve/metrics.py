"""Prometheus metrics of one server (its own registry, so that several servers can live in one process).

Per adapter (label ``adapter``: the version that served, ``""`` for the base model): requests by status,
latency, time to first token, prompt and generated tokens, adapter loads, slot hits and misses; for the
engine: tokens per second, queue depth, running requests. `metrics_router` serves them with /health.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tailor_requests", "Requests answered, by model asked for, adapter version "
                                "that served and HTTP status.", ["model", "adapter", "status"], registry=r)
        self.latency = Histogram("tailor_request_latency_seconds", "Time from arrival to the last token.",
                                 ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("tailor_time_to_first_token_seconds", "Time from arrival to the first token.",
                              ["adapter"], buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("tailor_prompt_tokens", "Prompt tokens.", ["adapter"], registry=r)
        self.generated_tokens = Counter("tailor_generated_tokens", "Generated tokens.", ["adapter"],
                                        registry=r)
        self.tokens_per_second = Gauge("tailor_tokens_per_second", "Tokens computed per second by the engine "
                                       "(prefill + decode), over its last steps.", registry=r)
        self.queue_depth = Gauge("tailor_queue_depth", "Requests waiting to start.", registry=r)
        self.running = Gauge("tailor_running_requests", "Requests in the running batch.", registry=r)
        self.adapter_loads = Counter("tailor_adapter_loads", "Adapters read from disk.", ["adapter"],
                                     registry=r)
        self.adapter_load_seconds = Histogram("tailor_adapter_load_seconds", "Reading an adapter from disk.",
                                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2),
                                              registry=r)
        self.slot_hits = Counter("tailor_adapter_slot_hits", "Requests whose adapter was in a slot.",
                                 ["adapter"], registry=r)
        self.slot_misses = Counter("tailor_adapter_slot_misses", "Requests whose adapter had to be put in a "
                                   "slot.", ["adapter"], registry=r)
        self.routed = Counter("tailor_route_requests", "Requests to an A/B route, by the version chosen.",
                              ["route", "version"], registry=r)
        self.auto_routes = Counter("tailor_auto_routes", "Requests routed by content (model \"auto\" or a "
                                   "router), by router and the adapter chosen (\"\": the base model).",
                                   ["router", "adapter"], registry=r)
        self.auto_fallbacks = Counter("tailor_auto_fallbacks", "Requests routed by content that no adapter "
                                      "was close to (low confidence): answered by the base model.",
                                      ["router"], registry=r)
        self._window: list[tuple[int, float]] = []

    def on_auto_route(self, routed) -> None:
        """Count one request routed by content (a tailor.serve.auto.Routed)."""
        self.auto_routes.labels(routed.router, routed.adapter or "").inc()
        if routed.fallback:
            self.auto_fallbacks.labels(routed.router).inc()

    def on_adapter_event(self, event: str, adapter: str, seconds: float) -> None:
        if event == "load":
            self.adapter_loads.labels(adapter).inc()
            self.adapter_load_seconds.observe(seconds)
        elif event == "hit":
            self.slot_hits.labels(adapter).inc()
        elif event == "miss":
            self.slot_misses.labels(adapter).inc()

    def on_step(self, engine, tokens: int, seconds: float) -> None:
        self._window = (self._window + [(tokens, seconds)])[-32:]
        total = sum(s for _, s in self._window)
        if total > 0:
            self.tokens_per_second.set(sum(t for t, _ in self._window) / total)
        self.queue_depth.set(len(engine.waiting))
        self.running.set(len(engine.running))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def metrics_router(engine, metrics: ServerMetrics, model_name: str) -> APIRouter:
    """GET /health (liveness, with the engine's queue) and GET /metrics (Prometheus text)."""
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "running": len(engine.running),
                "waiting": len(engine.waiting)}

    @router.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_depth.set(len(engine.waiting))
        metrics.running.set(len(engine.running))
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return router
