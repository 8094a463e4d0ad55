"""Fine-tuning jobs, conversions and evaluations: one set of routes per job kind.

Creating a job answers 202 with a `Location` header; the job runs in a separate process under
the supervisor. Fine-tuning jobs follow OpenAI's `/v1/fine_tuning/jobs` closely enough for the
official `openai` client.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from service.context import Context, Owner, ServiceContext
from service.db import TERMINAL_STATUSES, Job
from service.errors import error_responses
from service.jobs import (
    KIND_NAMES,
    KIND_PATHS,
    MAX_PAGE,
    checkpoint_public,
    create_job,
    event_public,
    event_seq,
    get_job,
    job_public,
    jobs_public,
    list_checkpoints,
    list_events,
    list_jobs,
    page,
    request_stop,
    resume_job,
)
from service.schemas import (
    CheckpointPublic,
    ConversionCreate,
    ConversionPublic,
    EvaluationCreate,
    EvaluationPublic,
    EventPublic,
    FineTuningJobCreate,
    FineTuningJobPublic,
    Page,
)
from service.specs import SpecBuilder, conversion_spec, evaluation_spec, fine_tune_spec
from service.supervisor import STOP_CANCEL, STOP_PAUSE

logger = logging.getLogger(__name__)

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="the same key and body return the same job",
    ),
]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]

_AUTH = error_responses(401)
fine_tuning = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=_AUTH)
conversions = APIRouter(prefix="/v1/conversions", tags=["conversions"], responses=_AUTH)
evaluations = APIRouter(prefix="/v1/evaluations", tags=["evaluations"], responses=_AUTH)
# Creating a job can conflict with an earlier use of its Idempotency-Key or exceed the key's
# active jobs; stopping or resuming one can conflict with its status.
_CREATE_ERRORS = error_responses(409, 429)


# One server-sent event as the stream carries it: `data` is an EventPublic as JSON, and a last
# event named `end` (with `{}` as data and no id) says the job has finished.
_SSE_EVENT = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "event": {"type": "string", "enum": ["fine_tuning.job.event", "end"]},
        "data": {"type": "string"},
    },
    "required": ["event", "data"],
}


def _create_responses(public: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    repeated = {"model": public, "description": "the job an earlier request with this key made"}
    return {200: repeated, **_CREATE_ERRORS}


_ACTION_ERRORS = error_responses(409)


def _create(
    context: Context,
    owner: str,
    kind: str,
    body: BaseModel,
    spec_of: Callable[[SpecBuilder], dict[str, Any]],
    idempotency_key: str | None,
    response: Response,
) -> Any:
    with context.db.write() as session:
        builder = SpecBuilder(context.settings, session, owner, context.layout.root)
        job, created = create_job(
            session,
            kind=kind,
            owner=owner,
            body=body,
            build_spec=lambda: spec_of(builder),
            idempotency_key=idempotency_key,
            max_active=context.settings.max_active_jobs_per_key,
        )
        public = job_public(session, job)
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"{KIND_PATHS[kind]}/{job.id}"
    return public


@fine_tuning.post(
    "",
    response_model=FineTuningJobPublic,
    status_code=202,
    responses=_create_responses(FineTuningJobPublic),
)
def create_fine_tuning_job(
    body: FineTuningJobCreate,
    context: Context,
    owner: Owner,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    """Fine-tune a model on an uploaded file or a named data set.

    `model` is a model reference (Hugging Face id, timm name) or a checkpoint id from an earlier
    conversion or fine-tune; `conversion` converts a plain model to GMNM first. The job is
    queued; poll it, list its events, or stream them with `GET .../events?stream=true`.
    """
    return _create(
        context,
        owner,
        "fine_tune",
        body,
        lambda builder: fine_tune_spec(builder, body),
        idempotency_key,
        response,
    )


@conversions.post(
    "",
    response_model=ConversionPublic,
    status_code=202,
    responses=_create_responses(ConversionPublic),
)
def create_conversion(
    body: ConversionCreate,
    context: Context,
    owner: Owner,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    """Convert a model's activations and attention softmax to GMNM.

    The finished job holds the plan (every site found), the conversion report and a
    `checkpoint_id` for the converted model; with `dry_run` it holds only the plan.
    """
    return _create(
        context,
        owner,
        "conversion",
        body,
        lambda builder: conversion_spec(builder, body),
        idempotency_key,
        response,
    )


@evaluations.post(
    "",
    response_model=EvaluationPublic,
    status_code=202,
    responses=_create_responses(EvaluationPublic),
)
def create_evaluation(
    body: EvaluationCreate,
    context: Context,
    owner: Owner,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    """Evaluate a model on a data set or file, optionally against another model (`compare_to`).

    The finished job's `result` holds the metrics of both models and their differences.
    """
    return _create(
        context,
        owner,
        "evaluation",
        body,
        lambda builder: evaluation_spec(builder, body),
        idempotency_key,
        response,
    )


def _add_common_routes(router: APIRouter, kind: str, public: type[BaseModel]) -> None:
    """Retrieve, list, cancel, pause, resume, events and checkpoints for one job kind."""
    name = KIND_NAMES[kind]

    def retrieve(job_id: str, context: Context, owner: Owner) -> Any:
        with context.db.read() as session:
            return job_public(session, get_job(session, kind, owner, job_id))

    def list_all(
        context: Context,
        owner: Owner,
        after: str | None = None,
        limit: Limit = 20,
        status: str | None = None,
    ) -> Any:
        with context.db.read() as session:
            jobs, has_more = list_jobs(session, kind, owner, after, limit, status)
            return page(jobs_public(session, jobs), has_more)

    def stop(reason: str) -> Callable[..., Any]:
        def handler(job_id: str, context: Context, owner: Owner) -> Any:
            with context.db.write() as session:
                job = get_job(session, kind, owner, job_id)
                request_stop(session, job, reason)
                session.flush()
                return job_public(session, job)

        return handler

    def resume(job_id: str, context: Context, owner: Owner) -> Any:
        with context.db.write() as session:
            job = get_job(session, kind, owner, job_id)
            resume_job(session, job)
            session.flush()
            return job_public(session, job)

    def events(
        job_id: str,
        request: Request,
        context: Context,
        owner: Owner,
        after: str | None = None,
        limit: Limit = 20,
        stream: bool = False,
    ) -> Any:
        with context.db.read() as session:
            get_job(session, kind, owner, job_id)
            if not stream:
                rows, has_more = list_events(session, job_id, after, limit)
                return page([event_public(row) for row in rows], has_more)
        start = request.headers.get("last-event-id") or after
        if start is not None:
            # A malformed cursor is refused now: once the stream has started, an error can only
            # break the connection.
            event_seq(start)
        return StreamingResponse(
            _event_stream(context, job_id, start), media_type="text/event-stream"
        )

    def checkpoints(
        job_id: str,
        context: Context,
        owner: Owner,
        after: str | None = None,
        limit: Limit = 10,
    ) -> Any:
        with context.db.read() as session:
            get_job(session, kind, owner, job_id)
            rows, has_more = list_checkpoints(session, job_id, after, limit)
            return page([checkpoint_public(row) for row in rows], has_more)

    retrieve.__doc__ = f"One {name}: status, progress, latest metrics, error and timestamps."
    list_all.__doc__ = (
        f"This key's {name}s, newest first; page with `after` (the last id seen) and `limit`, "
        "filter with `status`."
    )
    cancel = stop(STOP_CANCEL)
    cancel.__doc__ = (
        f"Cancel a {name}: a queued one at once; a running one is asked to checkpoint and stop "
        "(SIGTERM), and is killed after the grace period."
    )
    pause = stop(STOP_PAUSE)
    pause.__doc__ = f"Pause a {name} after a checkpoint; `resume` continues it."
    resume.__doc__ = (
        f"Queue a paused, cancelled or failed {name} again; it continues from its last checkpoint."
    )
    events.__doc__ = (
        f"The {name}'s events, oldest first; `after` is the last event id seen. With "
        "`stream=true` the same events arrive as server-sent events until the job ends."
    )
    checkpoints.__doc__ = f"The {name}'s checkpoints, newest first."

    prefix = kind.replace("_", "")
    page_model: Any = Page[public]  # type: ignore[valid-type]
    add = router.add_api_route
    add("", list_all, methods=["GET"], response_model=page_model, name=f"list_{prefix}")
    add("/{job_id}", retrieve, methods=["GET"], response_model=public, name=f"get_{prefix}")
    for action, handler in (("cancel", cancel), ("pause", pause), ("resume", resume)):
        add(
            f"/{{job_id}}/{action}",
            handler,
            methods=["POST"],
            response_model=public,
            name=f"{action}_{prefix}",
            responses=_ACTION_ERRORS,
        )
    add(
        "/{job_id}/events",
        events,
        methods=["GET"],
        response_model=Page[EventPublic],
        name=f"events_{prefix}",
        responses={200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}}}},
    )
    add(
        "/{job_id}/checkpoints",
        checkpoints,
        methods=["GET"],
        response_model=Page[CheckpointPublic],
        name=f"checkpoints_{prefix}",
    )


def _fetch_events(
    context: ServiceContext, job_id: str, cursor: str | None
) -> tuple[list[EventPublic], bool]:
    with context.db.read() as session:
        job = session.get(Job, job_id)
        finished = job is None or job.status in TERMINAL_STATUSES
        rows, _ = list_events(session, job_id, cursor, MAX_PAGE)
        return [event_public(row) for row in rows], finished


async def _event_stream(context: Context, job_id: str, after: str | None) -> AsyncIterator[bytes]:
    """Server-sent events: each event once, then `event: end` when the job has finished."""
    cursor = after
    while True:
        events, finished = await run_in_threadpool(_fetch_events, context, job_id, cursor)
        for event in events:
            payload = json.dumps(event.model_dump(mode="json"))
            yield f"id: {event.id}\nevent: {event.object}\ndata: {payload}\n\n".encode()
            cursor = event.id
        if finished and not events:
            yield b"event: end\ndata: {}\n\n"
            return
        if not events:
            await asyncio.sleep(context.settings.poll_seconds)


_add_common_routes(fine_tuning, "fine_tune", FineTuningJobPublic)
_add_common_routes(conversions, "conversion", ConversionPublic)
_add_common_routes(evaluations, "evaluation", EvaluationPublic)
