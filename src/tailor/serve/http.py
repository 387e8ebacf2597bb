"""What every router of the server shares: its limits (`ServerConfig`), the Bearer-key check, the
bounded JSON body reader, and the error handlers that answer everything in OpenAI's error shape."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tailor.serve.metrics import ServerMetrics
from tailor.serve.protocol import APIError, bad_request


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


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                    code="request_too_large")


def add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    """Answer every error in OpenAI's shape with its status (an unexpected one as a 500, never a crash);
    API errors are counted per model asked for (`request.state.model`, set once the body is read)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        model = getattr(request.state, "model", "") or ""
        metrics.requests.labels(model, "", str(error.status)).inc()
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


__all__ = ["ServerConfig", "add_error_handlers", "authorize", "read_json"]
