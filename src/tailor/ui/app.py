"""`tailor ui`: the web page, added to the `tailor serve` app; the page talks to this app's own API.

  GET  /ui                          the page (runs, adapters, playground, planner); / redirects here
  GET  /ui/static/...               its script and style sheet (package data, nothing from the network)
  GET  /api/runs                    the runs under --runs, one line each
  GET  /api/runs/{name}             one run: config, summary, loss-curve points, eval.json
  GET  /api/compare?run=A&run=B     the comparison report's rows, columns and decision for those runs
  GET  /api/adapters                the adapter store (--adapters): versions, tags with history, lineage
  POST /api/adapters/tag            {tag: NAME@TAG, version}: point a tag at a version (admin)
  POST /api/adapters/rollback       {tag: NAME@TAG}: move a tag back to its previous version (admin)
  GET  /api/plan/form               the planner's inputs with their defaults and choices
  POST /api/plan                    `tailor plan --json` for the form's inputs

Errors come in the server's OpenAI shape with the right status. Nothing here writes anywhere but the
store's tags.json files (under the store's lock), and nothing reads outside the runs and adapter
directories: runs and adapters are named, never addressed by path, and the planner takes catalogue
names and sizes, not files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tailor.adapters.store import AdapterStore, StoreError, parse_ref
from tailor.compare.runner import DEFAULT_MARGIN, DEFAULT_PRICE_PER_HOUR
from tailor.serve.http import ServerConfig, authorize, read_json
from tailor.serve.protocol import APIError, bad_request, parse
from tailor.ui.runs import RunIndex, UnknownRunError

STATIC = Path(__file__).parent / "static"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    def unsupported(self) -> list[str]:  # serve.protocol.parse asks every body; the page's have none
        return []


class TagRequest(_Body):
    tag: str = Field(min_length=1)  # NAME@TAG
    version: int | str  # 3, "3", "NAME@3" or another tag


class RollbackRequest(_Body):
    tag: str = Field(min_length=1)


class PlanRequest(_Body):
    """The planner's inputs; what is left out takes `tailor plan`'s default."""

    model: str | None = None
    method: str | None = None
    rank: int | None = Field(default=None, ge=1)
    lora_alpha: float | None = Field(default=None, gt=0)
    target_modules: str | None = None
    batch_size: int | None = Field(default=None, ge=1)
    max_seq_len: int | None = Field(default=None, ge=1)
    grad_accum: int | None = Field(default=None, ge=1)
    gradient_checkpointing: bool | None = None
    optimizer: str | None = None
    precision: str | None = None
    device: str | None = None
    tokens: float | None = Field(default=None, gt=0)
    gpu: str | None = None
    mfu: float | None = Field(default=None, gt=0, le=1)


def add_ui(app: FastAPI, runs: RunIndex | str | Path, adapters: str | Path | None = None) -> FastAPI:
    """Add the page and its JSON endpoints to a `tailor serve` app (`create_app`'s).

    Raises:
        ValueError: `runs` (or `adapters`) is not a directory.
    """
    config: ServerConfig = app.state.config
    index = runs if isinstance(runs, RunIndex) else RunIndex(runs)
    store = AdapterStore(_directory(adapters, "adapter store")) if adapters is not None else None
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/ui")

    @router.get("/ui", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @router.get("/api/runs")
    async def list_runs(request: Request) -> dict:
        authorize(request, config)
        return {"root": str(index.root), "runs": await run_in_threadpool(index.rows)}

    @router.get("/api/runs/{name:path}")
    async def one_run(name: str, request: Request) -> dict:
        authorize(request, config)
        try:
            return await run_in_threadpool(index.run, name)
        except UnknownRunError as error:
            raise _not_found(error, "name") from None

    @router.get("/api/compare")
    async def compare(request: Request, run: list[str] = Query(default=[]),
                      price_per_hour: float = Query(default=DEFAULT_PRICE_PER_HOUR, gt=0),
                      margin: float = Query(default=DEFAULT_MARGIN, ge=0)) -> dict:
        authorize(request, config)
        if len(run) < 2:
            raise bad_request(f"Compare needs two or more runs (got {len(run)}): /api/compare?run=A&run=B.",
                              param="run")
        try:
            return await run_in_threadpool(index.compare, run, price_per_hour, margin)
        except UnknownRunError as error:
            raise _not_found(error, "run") from None

    @router.get("/api/adapters")
    async def list_adapters(request: Request) -> dict:
        authorize(request, config)
        if store is None:
            return {"root": None, "adapters": []}
        return {"root": str(store.root), "adapters": await run_in_threadpool(_store_view, store)}

    @router.post("/api/adapters/tag")
    async def tag(request: Request) -> dict:
        authorize(request, config, admin=True)
        body = parse(TagRequest, await read_json(request, config.max_body_bytes))
        previous, version = await _change(store, body.tag, lambda: store.tag(body.tag, body.version))
        return {"tag": body.tag, "previous": previous, "version": version}

    @router.post("/api/adapters/rollback")
    async def rollback(request: Request) -> dict:
        authorize(request, config, admin=True)
        body = parse(RollbackRequest, await read_json(request, config.max_body_bytes))
        previous, version = await _change(store, body.tag, lambda: store.rollback(body.tag))
        return {"tag": body.tag, "previous": previous, "version": version}

    @router.get("/api/plan/form")
    async def plan_form(request: Request) -> dict:
        authorize(request, config)
        return await run_in_threadpool(_plan_form)

    @router.post("/api/plan")
    async def make_plan(request: Request) -> dict:
        authorize(request, config)
        body = parse(PlanRequest, await read_json(request, config.max_body_bytes))
        return await run_in_threadpool(_plan, body)

    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    return app


def _directory(path: str | Path, what: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(f"{what} {str(path)!r} does not exist or is not a directory; create it, or give "
                         "the directory `tailor adapters` uses (--adapters DIR).")
    return directory


def _not_found(error: UnknownRunError, param: str) -> APIError:
    return APIError(404, str(error), type="not_found_error", param=param, code="run_not_found")


def _store_view(store: AdapterStore) -> list[dict[str, Any]]:
    """Each adapter name with its versions (the store's rows, lineage, when added) and its tags."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for row in store.rows():
        record = store.record(row["name"], row["version"])
        by_name.setdefault(row["name"], []).append(
            {**row, "added": record.get("added"), "lineage": store.lineage(row["ref"])})
    return [{"name": name, "versions": versions, "tags": store.tags(name)}
            for name, versions in by_name.items()]


async def _change(store: AdapterStore | None, tag_ref: str, change) -> tuple[int | None, int]:
    """Run a tag change; a bad reference is a 400 naming the fix, an unknown adapter a 404."""
    if store is None:
        raise bad_request("This server has no adapter store: start it with --adapters DIR.", param="tag")
    try:
        name, _ = parse_ref(tag_ref)
        if name not in store.names():
            raise APIError(404, f"No adapter {name!r} in the store {store.root}: GET /api/adapters lists "
                           "them.", type="not_found_error", param="tag", code="adapter_not_found")
        return await run_in_threadpool(change)
    except StoreError as error:
        raise bad_request(str(error), param="tag", code="store_error") from None


def _plan_form() -> dict[str, Any]:
    """The form's fields with `tailor plan`'s defaults (PlanInputs; the device is this machine's, as for
    `tailor plan`), and the choices the planner knows."""
    import dataclasses

    from tailor.methods import METHOD_SPECS
    from tailor.names import DEFAULT_MODEL
    from tailor.plan.catalogue import CATALOGUE
    from tailor.plan.inputs import PlanInputs, this_machine_device
    from tailor.plan.memory import DEVICES, PRECISIONS
    from tailor.plan.optimizer import OPTIMIZERS

    fields = {f.name: f.default for f in dataclasses.fields(PlanInputs)}
    defaults = {name: fields[name] for name in PlanRequest.model_fields if name in fields}
    defaults.update(model=DEFAULT_MODEL, device=this_machine_device())
    return {"defaults": defaults, "models": sorted(CATALOGUE), "methods": sorted(METHOD_SPECS),
            "optimizers": list(OPTIMIZERS), "precisions": ["auto", *PRECISIONS], "devices": list(DEVICES)}


def _plan(body: PlanRequest) -> dict[str, Any]:
    """`tailor plan`'s result for the form: the same inputs resolved the same way (tailor.plan.inputs)."""
    from tailor.plan import PlanError
    from tailor.plan.catalogue import catalogue_lookup, parse_param_count
    from tailor.plan.inputs import plan_inputs, resolve_inputs

    given = body.model_dump(exclude_none=True)
    model = given.pop("model", None) or _plan_form()["defaults"]["model"]
    if catalogue_lookup(model) is None and model not in ("SmolLM2-135M-Instruct", "default") \
            and parse_param_count(model) is None:
        raise bad_request(f"model {model!r} is neither a catalogue model nor a size: the page plans "
                          "catalogue models (e.g. SmolLM2-135M) and sizes (e.g. 7B); plan a local "
                          "config.json or .gguf with `tailor plan --model PATH`.", param="model",
                          code="unknown_model")
    basis = "given in the form" if "tokens" in given else "default (1e7); give training tokens in the form"
    try:
        inputs, _ = resolve_inputs(None, {**given, "model": model})
        return plan_inputs(inputs, basis)
    except (PlanError, TypeError, ValueError) as error:
        raise bad_request(str(error), code="plan_error") from None


__all__ = ["add_ui"]
