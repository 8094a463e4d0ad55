"""Checkpoints: their description, a deterministic archive of their directory, and curves."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response

from service.archive import write_archive
from service.context import Context, Owner, ServiceContext
from service.db import CheckpointRecord
from service.errors import ApiError, DownloadResponse, error_responses, not_found
from service.jobs import checkpoint_public
from service.schemas import CheckpointPublic
from training import protocol
from training.checkpoint import TRAINING_STATE_FILE

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"], responses=error_responses(401))

# What a model download leaves out unless the training state is asked for.
MODEL_ONLY_EXCLUDES = frozenset({TRAINING_STATE_FILE})

# One archive build per checkpoint at a time; later requests wait and reuse it.
_build_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _owned(context: ServiceContext, owner: str, checkpoint_id: str) -> CheckpointRecord:
    with context.db.read() as session:
        record = session.get(CheckpointRecord, checkpoint_id)
    if record is None or record.owner != owner:
        raise not_found("checkpoint", checkpoint_id)
    return record


def ensure_full_archive(context: ServiceContext, record: CheckpointRecord) -> tuple[Path, str]:
    """The archive with the training state as well; its sha256 is kept beside it."""
    archive = context.layout.archive_path(record.id).with_suffix(".full.tar")
    digest_file = archive.with_name(archive.name + ".sha256")
    with _lock_for(record.id + ".full"):
        if not (archive.exists() and digest_file.exists()):
            sha256, _ = write_archive(_source(context, record), archive, top=record.id)
            digest_file.write_text(sha256)
    return archive, digest_file.read_text().strip()


def _lock_for(key: str) -> threading.Lock:
    with _locks_guard:
        return _build_locks.setdefault(key, threading.Lock())


def _source(context: ServiceContext, record: CheckpointRecord) -> Path:
    source = context.layout.root / record.path
    if not source.is_dir():
        raise ApiError(
            410,
            f"Checkpoint {record.id} is recorded but its directory ({record.path}) is gone "
            "from the server's data directory, so it cannot be archived or downloaded; ask the "
            "operator to restore that directory from a backup, or create a job like "
            f"{record.job_id} again to write a new checkpoint.",
            type="invalid_request_error",
            code="checkpoint_missing",
        )
    return source


def ensure_archive(context: ServiceContext, record: CheckpointRecord) -> CheckpointRecord:
    """Build the checkpoint's archive (the model, without training state) once, and record its
    sha256 and size."""
    archive = context.layout.archive_path(record.id)
    if record.sha256 is not None and archive.exists():
        return record
    with _lock_for(record.id):
        with context.db.read() as session:
            fresh = session.get(CheckpointRecord, record.id)
        if fresh is not None and fresh.sha256 is not None and archive.exists():
            return fresh
        source = _source(context, record)
        sha256, size = write_archive(source, archive, top=record.id, exclude=MODEL_ONLY_EXCLUDES)
        with context.db.write() as session:
            row = session.get(CheckpointRecord, record.id)
            assert row is not None
            row.sha256, row.size = sha256, size
            session.flush()
            session.expunge(row)
        logger.info("archived checkpoint %s (%d bytes, sha256 %s)", record.id, size, sha256)
        return row


@router.get("/{checkpoint_id}", response_model=CheckpointPublic, responses=error_responses(410))
def retrieve_checkpoint(checkpoint_id: str, context: Context, owner: Owner) -> Any:
    """A checkpoint's step, metrics, and the sha256 and size of its archive."""
    record = ensure_archive(context, _owned(context, owner, checkpoint_id))
    return checkpoint_public(record)


@router.get(
    "/{checkpoint_id}/content",
    response_class=DownloadResponse,
    responses={
        200: {"content": {"application/x-tar": {}}},
        304: {"description": "not modified: If-None-Match named the archive's ETag"},
        **error_responses(410, 416),
    },
)
def checkpoint_content(
    checkpoint_id: str,
    request: Request,
    context: Context,
    owner: Owner,
    training_state: bool = False,
) -> Response:
    """The checkpoint directory as an uncompressed tar under one folder named after its id.

    By default the archive holds the model (weights, manifest, config, tokenizer) and leaves out
    the optimizer and scheduler state, which only resuming the job needs; `training_state=true`
    includes it. The archive is byte-for-byte reproducible: its sha256 is the `ETag` and the
    `X-Checkpoint-SHA256` header. Range requests resume an interrupted download. Extract it and
    open the folder with `surgery.load`.
    """
    record = _owned(context, owner, checkpoint_id)
    if training_state:
        path, sha256 = ensure_full_archive(context, record)
    else:
        record = ensure_archive(context, record)
        path, sha256 = context.layout.archive_path(record.id), str(record.sha256)
    etag = f'"{sha256}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return DownloadResponse(
        path,
        media_type="application/x-tar",
        filename=path.name,
        headers={"ETag": etag, "X-Checkpoint-SHA256": sha256},
    )


@router.get(
    "/{checkpoint_id}/curves.png",
    response_class=DownloadResponse,
    responses={200: {"content": {"image/png": {}}}, **error_responses(416)},
)
def checkpoint_curves(checkpoint_id: str, context: Context, owner: Owner) -> Response:
    """The training and validation curves of the job that wrote this checkpoint (PNG)."""
    record = _owned(context, owner, checkpoint_id)
    path = context.layout.job_dir(record.job_id) / protocol.CURVES_FILE
    if not path.is_file():
        raise ApiError(
            404,
            f"The job that wrote checkpoint {record.id} has no curves: a fine-tune draws them "
            "when it ends, and conversions and evaluations draw none. Ask again for a "
            "fine-tune's checkpoint once that job has finished.",
            code="curves_not_found",
        )
    return DownloadResponse(path, media_type="image/png")
