"""The one error envelope: every 4xx and 5xx answers `{"error": {message, type, param, code}}`.

Routing errors (404, 405), request validation (which names the offending field) and unexpected
exceptions all go through the handlers installed by `install_error_handlers`; downloads answer a
refused `Range` header through `DownloadResponse`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """What every failed request returns."""

    error: ErrorBody


class ApiError(Exception):
    """An error the API reports to the caller; `status` is the HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers


_DESCRIPTIONS = {
    400: "invalid request: the message names the field and what to change",
    401: "missing or invalid API key",
    404: "no such object for this key, or no such route",
    409: "conflict with the object's state or with an earlier use of the Idempotency-Key",
    410: "the object is recorded but its files are gone",
    413: "request body larger than the upload limit",
    416: "the Range header asks for bytes past the end of the file",
    429: "too many active jobs for this key",
    500: "unexpected server failure (the server log has the traceback)",
    503: "the database is busy or unreachable; retry after the Retry-After seconds",
}


_HEADERS = {
    416: {
        "Content-Range": {
            "description": "`bytes */SIZE`: the size of the whole file",
            "schema": {"type": "string"},
        }
    },
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for error statuses, all answered with the envelope."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {"model": ErrorResponse, "description": _DESCRIPTIONS[status]}
        if status in _HEADERS:
            responses[status]["headers"] = _HEADERS[status]
    return responses


def not_found(kind: str, object_id: str, param: str | None = None) -> ApiError:
    return ApiError(
        404,
        f"No {kind} with id '{object_id}' exists (or it belongs to another API key); "
        f"list them with GET to find a valid id.",
        param=param,
        code="not_found",
    )


_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    416: "invalid_request_error",
    429: "rate_limit_error",
}


def envelope(status: int, message: str, **fields: Any) -> JSONResponse:
    body = ErrorBody(
        message=message,
        type=fields.get("type") or _STATUS_TYPES.get(status, "server_error"),
        param=fields.get("param"),
        code=fields.get("code"),
    )
    return JSONResponse(
        {"error": body.model_dump()}, status_code=status, headers=fields.get("headers")
    )


# Starlette's reasons for refusing a Range header, in words that say what to change.
_RANGE_PROBLEMS = {
    "Only support bytes range": "its unit is not bytes",
    "Range header: range must be requested": "it names no range of bytes",
    "Range header: start must be less than end": "a range ends before it starts",
}


class DownloadResponse(FileResponse):
    """A file download whose refusal of a `Range` header answers in the error envelope.

    Starlette's FileResponse answers a malformed range itself with a plain-text 400, and a range
    past the end of the file with an empty 416.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = await self._range_refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def _range_refusal(self, scope: Scope) -> JSONResponse | None:
        # The same conditions and parser as FileResponse, so that exactly the ranges it would
        # refuse are refused here and every other one is served as before.
        headers = Headers(scope=scope)
        value = headers.get("range")
        if value is None or self.status_code != 200 or scope["type"] != "http":
            return None
        if scope["method"].upper() not in ("GET", "HEAD"):
            return None
        stat = self.stat_result
        if stat is None:
            stat = await anyio.to_thread.run_sync(os.stat, self.path)
        self.set_stat_headers(stat)
        if_range = headers.get("if-range")
        if if_range is not None and not self._should_use_range(if_range):
            return None
        size = stat.st_size
        whole = (
            "the file is empty, so leave the header out"
            if size == 0
            else f"ask for bytes within 0-{size - 1} (e.g. `Range: bytes=0-{size - 1}`), or "
            "leave the header out for the whole file"
        )
        try:
            self._parse_range_header(value, size)
        except MalformedRangeHeader as error:
            problem = _RANGE_PROBLEMS.get(error.content, "it is not of the form bytes=START-END")
            return envelope(
                400,
                f"Range: '{value}' cannot be served because {problem}; the file is {size} "
                f"bytes: {whole}.",
                param="Range",
                code="invalid_range",
            )
        except RangeNotSatisfiable:
            return envelope(
                416,
                f"Range: '{value}' starts at or past the end of the file, which is {size} "
                f"bytes: {whole}.",
                param="Range",
                code="range_not_satisfiable",
                headers={"Content-Range": f"bytes */{size}"},
            )
        return None


def _field_path(loc: tuple[Any, ...]) -> str:
    # The first element says where the value came from (body, query, path, header).
    parts = [str(part) for part in loc[1:]] if len(loc) > 1 else [str(part) for part in loc]
    return ".".join(parts)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return envelope(
        exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, headers=exc.headers
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"No route {request.method} {request.url.path}; see /docs for the API."
        code = "not_found"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; see /docs."
        code = "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    return envelope(exc.status_code, message, code=code, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        return _invalid_json(errors[0], exc.body)
    problems = []
    for error in errors:
        path = _field_path(tuple(error.get("loc", ())))
        problems.append((path, f"{path}: {error.get('msg', 'invalid')}"))
    param = problems[0][0] if problems else None
    message = "Invalid request: " + "; ".join(text for _, text in problems)
    return envelope(400, message, param=param, code="invalid_value")


def _invalid_json(error: dict[str, Any], document: Any) -> JSONResponse:
    # FastAPI reports the decoder's character offset where a field path would be, which the
    # generic handler would turn into `param: "45"`.
    loc = tuple(error.get("loc", ()))
    position = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    # The decoder's reasons read "Expecting value", "Unterminated string starting at", ...
    reason = str((error.get("ctx") or {}).get("error") or "malformed").removesuffix(" at")
    where = ""
    if position is not None and isinstance(document, str):
        line = document.count("\n", 0, position) + 1
        column = position - document.rfind("\n", 0, position)
        where = f" at line {line}, column {column} (character {position})"
    elif position is not None:
        where = f" at character {position}"
    return envelope(
        400,
        f"The request body is not valid JSON: {reason}{where}. Send one JSON object with "
        "`Content-Type: application/json`; check the quotes, commas and brackets at that point.",
        param="body",
        code="invalid_json",
    )


# How long a client should wait before retrying a request the database could not take.
DATABASE_RETRY_SECONDS = 2


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # A writer holding SQLite's lock past the busy timeout, a PostgreSQL lock or connection
    # failure, or an exhausted connection pool: the transaction was rolled back, so the request
    # changed nothing and can simply be sent again.
    reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
    logger.warning("database unavailable on %s %s: %s", request.method, request.url.path, reason)
    return envelope(
        503,
        f"The database is busy or unreachable ({reason}); nothing was changed. Retry in "
        f"{DATABASE_RETRY_SECONDS} seconds.",
        type="server_error",
        code="database_unavailable",
        headers={"Retry-After": str(DATABASE_RETRY_SECONDS)},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return envelope(
        500,
        f"The server failed on this request ({type(exc).__name__}); the server log has the "
        "traceback. Retry, and report it if it persists.",
        type="server_error",
        code="internal_error",
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(PoolTimeoutError, _database_unavailable)
    app.add_exception_handler(Exception, _unexpected)
