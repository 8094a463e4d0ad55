"""Jobs as the API sees them: create (idempotently), read, page through, stop and resume.

The API only writes requests into the database; the supervisor does the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import (
    ACTIVE_STATUSES,
    CANCELLED,
    CANCELLING,
    FAILED,
    JOB_STATUSES,
    PAUSED,
    QUEUED,
    RUNNING,
    CheckpointRecord,
    EventRecord,
    Job,
)
from service.errors import ApiError, not_found
from service.layout import EVENT_PREFIX, JOB_PREFIXES, new_id
from service.schemas import (
    CheckpointMetrics,
    CheckpointPublic,
    ConversionPublic,
    EvaluationPublic,
    EventPublic,
    FineTuningHyperparameters,
    FineTuningJobPublic,
    JobError,
    Page,
    Progress,
)
from service.specs import BASE_LEARNING_RATE
from service.supervisor import STOP_CANCEL

logger = logging.getLogger(__name__)

KIND_NAMES = {
    "fine_tune": "fine-tuning job",
    "conversion": "conversion",
    "evaluation": "evaluation",
}
KIND_PATHS = {
    "fine_tune": "/v1/fine_tuning/jobs",
    "conversion": "/v1/conversions",
    "evaluation": "/v1/evaluations",
}
MAX_PAGE = 100
NO_RETRY = {"x-should-retry": "false"}

JobPublic = FineTuningJobPublic | ConversionPublic | EvaluationPublic


def request_hash(kind: str, body: BaseModel) -> str:
    canonical = json.dumps(
        {"kind": kind, "body": body.model_dump(mode="json", exclude_unset=True)}, sort_keys=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def create_job(
    session: Session,
    *,
    kind: str,
    owner: str,
    body: BaseModel,
    build_spec: Callable[[], dict[str, Any]],
    idempotency_key: str | None,
    max_active: int,
) -> tuple[Job, bool]:
    """Insert a queued job; returns (job, created). A repeated idempotency key returns the first."""
    digest = request_hash(kind, body)
    if idempotency_key is not None:
        existing = _job_for_key(session, owner, idempotency_key, digest)
        if existing is not None:
            return existing, False

    active = session.scalar(
        select(func.count()).where(Job.owner == owner, Job.status.in_(ACTIVE_STATUSES))
    )
    if (active or 0) >= max_active:
        raise ApiError(
            429,
            f"This API key already has {active} queued or running jobs, the most allowed "
            f"(GMNM_MAX_ACTIVE_JOBS_PER_KEY={max_active}); wait for one to finish or cancel one.",
            type="rate_limit_error",
            code="too_many_active_jobs",
            headers=NO_RETRY,
        )

    spec = build_spec()
    job = Job(
        id=new_id(JOB_PREFIXES[kind]),
        kind=kind,
        owner=owner,
        status=QUEUED,
        request=body.model_dump(mode="json", exclude_unset=True),
        spec=spec,
        idempotency_key=idempotency_key,
        request_hash=digest,
        created_at=time.time(),
        attempts=0,
        resume=False,
        events_offset=0,
        result_files=[],
    )
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:
        # A request with the same key inserted its job after the lookup above and committed
        # (PostgreSQL lets concurrent retries both pass the lookup; SQLite's write lock does
        # not): answer as the lookup would have, with that job or a 409.
        existing = None
        if idempotency_key is not None:
            existing = _job_for_key(session, owner, idempotency_key, digest)
        if existing is None:
            raise
        return existing, False
    session.add(_event(job.id, f"Created {KIND_NAMES[kind]} {job.id}."))
    session.flush()
    return job, True


def _job_for_key(session: Session, owner: str, idempotency_key: str, digest: str) -> Job | None:
    """The job an earlier request with this key created, if any; 409 if its body differed."""
    existing = session.scalars(
        select(Job).where(Job.owner == owner, Job.idempotency_key == idempotency_key)
    ).first()
    if existing is not None and existing.request_hash != digest:
        raise ApiError(
            409,
            f"Idempotency-Key '{idempotency_key}' was already used with a different "
            f"request (job {existing.id}); use a new key for a new request.",
            type="conflict_error",
            param="Idempotency-Key",
            code="idempotency_key_reused",
            headers=NO_RETRY,
        )
    return existing


def _event(job_id: str, message: str, level: str = "info") -> EventRecord:
    return EventRecord(
        job_id=job_id, created_at=time.time(), level=level, type="message", message=message
    )


def get_job(session: Session, kind: str, owner: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.owner != owner or job.kind != kind:
        raise not_found(KIND_NAMES[kind], job_id)
    return job


def list_jobs(
    session: Session,
    kind: str,
    owner: str,
    after: str | None,
    limit: int,
    status: str | None,
) -> tuple[list[Job], bool]:
    """Newest first; `after` is the id of the last job of the previous page."""
    query = select(Job).where(Job.owner == owner, Job.kind == kind)
    if status is not None:
        if status not in JOB_STATUSES:
            raise ApiError(
                400,
                f"status: '{status}' is not a job status; use one of {', '.join(JOB_STATUSES)}.",
                param="status",
            )
        query = query.where(Job.status == status)
    if after is not None:
        anchor = session.get(Job, after)
        if anchor is None or anchor.owner != owner or anchor.kind != kind:
            raise not_found(KIND_NAMES[kind], after, param="after")
        query = query.where(
            or_(
                Job.created_at < anchor.created_at,
                and_(Job.created_at == anchor.created_at, Job.id < anchor.id),
            )
        )
    rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1))
    jobs = list(rows)
    return jobs[:limit], len(jobs) > limit


def request_stop(session: Session, job: Job, reason: str) -> None:
    """Cancel or pause: a queued job stops at once, a running one after its next checkpoint."""
    verb = "cancel" if reason == STOP_CANCEL else "pause"
    if job.status == QUEUED:
        job.status = CANCELLED if reason == STOP_CANCEL else PAUSED
        job.finished_at = time.time()
        session.add(_event(job.id, f"Job {job.status} before it started."))
        return
    if job.status == RUNNING:
        job.status = CANCELLING
        job.stop_reason = reason
        job.stop_requested_at = time.time()
        session.add(_event(job.id, f"Asked to {verb}: the job will checkpoint and stop."))
        return
    if job.status == CANCELLING:
        return
    raise ApiError(
        409,
        f"Job {job.id} is already {job.status}, so it cannot be asked to {verb}.",
        type="conflict_error",
        code="job_not_active",
        headers=NO_RETRY,
    )


def resume_job(session: Session, job: Job) -> None:
    if job.status not in (CANCELLED, FAILED, PAUSED):
        raise ApiError(
            409,
            f"Job {job.id} is {job.status}; only cancelled, paused or failed jobs can be resumed.",
            type="conflict_error",
            code="job_not_resumable",
            headers=NO_RETRY,
        )
    job.status = QUEUED
    job.resume = True
    job.attempts = 0
    job.finished_at = None
    job.error_code = job.error_message = job.error_param = None
    session.add(_event(job.id, "Resumed: queued to continue from its last checkpoint."))


def list_events(
    session: Session, job_id: str, after: str | None, limit: int
) -> tuple[list[EventRecord], bool]:
    """Oldest first, so `after` (the last event seen) yields exactly the newer ones."""
    query = select(EventRecord).where(EventRecord.job_id == job_id)
    if after is not None:
        query = query.where(EventRecord.seq > event_seq(after))
    rows = list(session.scalars(query.order_by(EventRecord.seq).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def event_seq(event_id: str) -> int:
    number = event_id.removeprefix(f"{EVENT_PREFIX}-")
    if not number.isdigit():
        raise ApiError(
            400,
            f"after: '{event_id}' is not an event id (they look like {EVENT_PREFIX}-12).",
            param="after",
        )
    return int(number)


def list_checkpoints(
    session: Session, job_id: str, after: str | None, limit: int
) -> tuple[list[CheckpointRecord], bool]:
    """Newest first, as OpenAI lists them."""
    query = select(CheckpointRecord).where(CheckpointRecord.job_id == job_id)
    if after is not None:
        anchor = session.get(CheckpointRecord, after)
        if anchor is None or anchor.job_id != job_id:
            raise not_found("checkpoint", after, param="after")
        query = query.where(CheckpointRecord.step < anchor.step)
    rows = list(session.scalars(query.order_by(CheckpointRecord.step.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


# public shapes


def latest_checkpoint(session: Session, job_id: str) -> CheckpointRecord | None:
    return latest_checkpoints(session, [job_id]).get(job_id)


def latest_checkpoints(session: Session, job_ids: list[str]) -> dict[str, CheckpointRecord]:
    """The newest checkpoint of each job, in one query however many jobs a page holds."""
    if not job_ids:
        return {}
    newest = (
        select(CheckpointRecord.job_id, func.max(CheckpointRecord.step).label("step"))
        .where(CheckpointRecord.job_id.in_(job_ids))
        .group_by(CheckpointRecord.job_id)
        .subquery()
    )
    rows = session.scalars(
        select(CheckpointRecord).join(
            newest,
            (CheckpointRecord.job_id == newest.c.job_id) & (CheckpointRecord.step == newest.c.step),
        )
    )
    return {row.job_id: row for row in rows}


def _seconds(value: float | None) -> int | None:
    return None if value is None else int(value)


def _progress(job: Job) -> tuple[Progress, int | None]:
    raw = job.progress or {}
    step, total = raw.get("step"), raw.get("total_steps")
    percent = None
    if isinstance(step, int | float) and isinstance(total, int | float) and total > 0:
        percent = round(min(100.0, 100.0 * step / total), 2)
    progress = Progress(step=step, total_steps=total, epoch=raw.get("epoch"), percent=percent)
    estimate = None
    if job.status == RUNNING and percent is not None and step is not None and total is not None:
        elapsed = raw.get("time", 0.0) - raw.get("rate_from_time", 0.0)
        done = step - raw.get("rate_from_step", step)
        if elapsed > 0 and done > 0:
            estimate = int(raw["time"] + (total - step) * elapsed / done)
    return progress, estimate


def _common(job: Job) -> dict[str, Any]:
    progress, estimate = _progress(job)
    error = None
    if job.error_code is not None:
        error = JobError(
            code=job.error_code, message=job.error_message or "", param=job.error_param
        )
    return {
        "id": job.id,
        "status": job.status,
        "model": job.request.get("model", ""),
        "created_at": int(job.created_at),
        "started_at": _seconds(job.started_at),
        "finished_at": _seconds(job.finished_at),
        "estimated_finish": estimate,
        "progress": progress,
        "metrics": job.metrics,
        "error": error,
        "attempts": job.attempts,
        "device": job.device,
        "metadata": job.request.get("metadata"),
    }


def jobs_public(session: Session, jobs: list[Job]) -> list[JobPublic]:
    checkpoints = latest_checkpoints(session, [job.id for job in jobs])
    return [_job_public(job, checkpoints.get(job.id)) for job in jobs]


def job_public(session: Session, job: Job) -> JobPublic:
    return _job_public(job, latest_checkpoint(session, job.id))


def _job_public(job: Job, checkpoint: CheckpointRecord | None) -> JobPublic:
    common = _common(job)
    checkpoint_id = None if checkpoint is None else checkpoint.id
    request = job.request
    if job.kind == "conversion":
        result = job.result or {}
        return ConversionPublic(
            **common,
            dry_run=bool(request.get("dry_run", False)),
            plan=result.get("plan"),
            report=result.get("report"),
            checkpoint_id=checkpoint_id,
        )
    if job.kind == "evaluation":
        return EvaluationPublic(
            **common,
            task=job.spec.get("task"),
            dataset=request.get("dataset"),
            file=request.get("file"),
            compare_to=request.get("compare_to"),
            result=job.result,
        )
    spec_hyperparameters = job.spec.get("hyperparameters") or {}
    given = request.get("hyperparameters") or {}
    multiplier = given.get("learning_rate_multiplier")
    if multiplier in (None, "auto") and "learning_rate" in spec_hyperparameters:
        multiplier = spec_hyperparameters["learning_rate"] / BASE_LEARNING_RATE
    hyperparameters = {
        **spec_hyperparameters,
        "n_epochs": spec_hyperparameters.get("epochs", "auto"),
        "batch_size": spec_hyperparameters.get("batch_size", "auto"),
        "learning_rate_multiplier": multiplier if multiplier is not None else "auto",
    }
    return FineTuningJobPublic(
        **common,
        organization_id=f"org-{job.owner}",
        fine_tuned_model=checkpoint_id if job.status == "succeeded" else None,
        trained_tokens=job.trained_tokens,
        result_files=list(job.result_files or []),
        training_file=request.get("training_file"),
        validation_file=request.get("validation_file"),
        dataset=request.get("dataset"),
        hyperparameters=FineTuningHyperparameters(**hyperparameters),
        seed=int(job.spec.get("seed", 0)),
        task=job.spec.get("task"),
        conversion=request.get("conversion"),
        checkpoint_id=checkpoint_id,
        method=request.get("method"),
        user_provided_suffix=request.get("suffix"),
    )


def event_public(event: EventRecord) -> EventPublic:
    level = event.level if event.level in ("info", "warn", "error") else "info"
    return EventPublic(
        id=f"{EVENT_PREFIX}-{event.seq}",
        created_at=int(event.created_at),
        level=level,  # type: ignore[arg-type]
        message=event.message,
        type="metrics" if event.type == "metrics" else "message",
        data=event.data,
        step=event.step,
    )


def checkpoint_public(checkpoint: CheckpointRecord) -> CheckpointPublic:
    metrics = dict(checkpoint.metrics or {})
    metrics.setdefault("step", float(checkpoint.step))
    for ours, theirs in (("loss", "train_loss"), ("val_loss", "valid_loss")):
        if ours in metrics and theirs not in metrics:
            metrics[theirs] = metrics[ours]
    return CheckpointPublic(
        id=checkpoint.id,
        created_at=int(checkpoint.created_at),
        fine_tuned_model_checkpoint=checkpoint.id,
        fine_tuning_job_id=checkpoint.job_id,
        step_number=checkpoint.step,
        metrics=CheckpointMetrics(**metrics),
        sha256=checkpoint.sha256,
        size=checkpoint.size,
        content_url=f"/v1/checkpoints/{checkpoint.id}/content",
    )


def page(items: list[Any], has_more: bool) -> Page[Any]:
    return Page(
        data=items,
        has_more=has_more,
        first_id=items[0].id if items else None,
        last_id=items[-1].id if items else None,
    )
