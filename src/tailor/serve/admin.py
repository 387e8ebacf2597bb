"""The admin API: load and unload adapters, list and change A/B routes (changes need the admin key).

  POST /v1/load_lora_adapter       {lora_name, lora_path?}: serve an adapter from under the root
  POST /v1/unload_lora_adapter     {lora_name}
  GET  /v1/routes, POST /v1/routes {name, targets}, DELETE /v1/routes/{name}
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from tailor.serve.adapters import AdapterManager, AdapterRefusedError, UnknownAdapterError
from tailor.serve.http import ServerConfig, authorize, read_json
from tailor.serve.protocol import APIError, bad_request, model_not_found
from tailor.serve.routes import RouteError, Routes, parse_targets


def admin_router(manager: AdapterManager | None, config: ServerConfig, routes: Routes) -> APIRouter:
    """The adapter and route endpoints over `manager` (None: a server without adapters)."""
    router = APIRouter()

    @router.post("/v1/load_lora_adapter")
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

    @router.post("/v1/unload_lora_adapter")
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

    @router.get("/v1/routes")
    async def list_routes(request: Request) -> dict:
        authorize(request, config)
        data = [{"name": r.name, "targets": dict(r.targets), "auto": r.auto} for r in routes.all()]
        return {"object": "list", "data": data}

    @router.post("/v1/routes")
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
        return {"name": route.name, "targets": dict(route.targets), "auto": route.auto}

    @router.delete("/v1/routes/{name}")
    async def delete_route(name: str, request: Request) -> dict:
        authorize(request, config, admin=True)
        if not routes.delete(name):
            raise APIError(404, f"No route {name!r}.", param="name", code="route_not_found")
        return {"name": name, "deleted": True}

    return router


async def _check_adapter(manager: AdapterManager | None, name: str) -> None:
    """A route's version must be an adapter of this server (a 400 naming it otherwise)."""
    if manager is None:
        raise model_not_found(name)
    try:
        await run_in_threadpool(manager.path, name)
    except UnknownAdapterError:
        raise bad_request(f"Route version {name!r} is not an adapter of this server.", param="targets",
                          code="model_not_found") from None
    except AdapterRefusedError as error:
        raise bad_request(str(error), param="targets") from None


__all__ = ["admin_router"]
