"""The FastAPI application: `create_app(settings)` wires the database, keys, supervisor, routes.

At start-up the schema is migrated (SQLite only; other databases are upgraded by the operator with
`gmnm db upgrade`), and the supervisor starts unless `GMNM_RUN_SUPERVISOR=false` (then separate
`gmnm worker` processes run the jobs).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import KeyRing
from service.context import ServiceContext
from service.db import Database, upgrade
from service.errors import envelope, error_responses, install_error_handlers
from service.layout import Layout
from service.metrics import ServiceMetrics
from service.routes import checkpoints, files, health, jobs
from service.settings import Settings
from service.supervisor import Supervisor

logger = logging.getLogger(__name__)

DESCRIPTION = """Convert models to GMNM (trainable Gaussian-mixture nonlinearities), fine-tune and
evaluate them, and download the checkpoints. Files, fine-tuning jobs, events and checkpoints
follow OpenAI's fine-tuning API, so the `openai` Python client works against this server.
Every error answers `{"error": {"message", "type", "param", "code"}}`."""


class UploadLimit:
    """Refuses request bodies past the upload limit, before they are read into memory or disk."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        # Multipart framing adds a little to the file itself.
        allowance = self.limit + 64 * 1024
        if declared is not None and declared.isdigit() and int(declared) > allowance:
            response = envelope(
                413,
                f"The request body ({int(declared)} bytes) is larger than this server's upload "
                f"limit of {self.limit} bytes (GMNM_MAX_UPLOAD_BYTES).",
                code="request_too_large",
            )
            await response(scope, receive, send)
            return
        received = 0
        overflowed = started = False

        # A body without a declared length is counted as it arrives. Past the limit the app is
        # told the client left (whatever parses the body gives up), its answer is dropped, and
        # the 413 goes out instead: an exception raised here would reach the app's body parser,
        # which reports any failure as a vague 400.
        async def counted() -> Message:
            nonlocal received, overflowed
            message = await receive()
            received += len(message.get("body", b""))
            if received > allowance:
                overflowed = True
                return {"type": "http.disconnect"}
            return message

        async def unless_overflowed(message: Message) -> None:
            nonlocal started
            if overflowed:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, unless_overflowed)
        except Exception:
            if not overflowed:
                raise
        if overflowed and not started:
            response = envelope(
                413,
                f"The request body is larger than this server's upload limit of {self.limit} "
                "bytes (GMNM_MAX_UPLOAD_BYTES).",
                code="request_too_large",
            )
            await response(scope, receive, send)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema without FastAPI's default 422 answers: validation errors are 400s
    in the error envelope, which every operation already documents."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    app.openapi_schema = schema
    return schema


def create_app(settings: Settings | None = None, *, run_supervisor: bool | None = None) -> FastAPI:
    settings = settings or Settings()
    layout = Layout(settings.data_dir)
    layout.create()
    database = Database(settings.resolved_database_url)
    if database.is_sqlite:
        upgrade(database)
    context = ServiceContext(
        settings=settings,
        db=database,
        layout=layout,
        keys=KeyRing(settings.key_digests()),
        metrics=ServiceMetrics(database),
    )
    start_supervisor = settings.run_supervisor if run_supervisor is None else run_supervisor

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not context.keys.enabled:
            logger.warning(
                "no API keys configured (GMNM_API_KEYS): every caller is trusted; keep the "
                "server on a loopback address"
            )
        if start_supervisor:
            context.supervisor = Supervisor(settings, database)
            context.supervisor.start()
        try:
            yield
        finally:
            if context.supervisor is not None:
                context.supervisor.stop()
            database.dispose()

    app = FastAPI(
        title="GMNM surgery service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses=error_responses(400, 404, 413, 500, 503),
    )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.state.context = context
    install_error_handlers(app)
    app.add_middleware(context.metrics.middleware)
    app.add_middleware(UploadLimit, limit=settings.max_upload_bytes)
    for router in (
        files.router,
        jobs.fine_tuning,
        jobs.conversions,
        jobs.evaluations,
        checkpoints.router,
        health.router,
    ):
        app.include_router(router)
    return app
