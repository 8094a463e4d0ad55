"""Uploaded data files: training and validation data, and the result files jobs produce."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, UploadFile
from sqlalchemy import and_, or_, select
from starlette.concurrency import run_in_threadpool

from service.context import Context, Owner
from service.db import FileRecord
from service.errors import ApiError, DownloadResponse, error_responses, not_found
from service.jobs import MAX_PAGE, page
from service.layout import FILE_PREFIX, new_id
from service.schemas import FileDeleted, FilePublic, Page
from training.data import inspect_file
from training.errors import DataError

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/files", tags=["files"], responses=error_responses(401))

PURPOSES = ("fine-tune", "evaluation")
_CHUNK = 1 << 20
# Stored names stay well under the 255 bytes a file name (and the database column) may hold.
_MAX_FILENAME_BYTES = 200


def file_public(record: FileRecord) -> FilePublic:
    return FilePublic(
        id=record.id,
        bytes=record.bytes,
        created_at=int(record.created_at),
        filename=record.filename,
        purpose=record.purpose,
        sha256=record.sha256,
        format=record.format,
        rows=record.rows,
    )


def safe_filename(given: str | None) -> str:
    """The upload's own name, reduced to something safe to store, log and link to.

    Only the last path component is kept (either slash), control characters are dropped, and a
    long name is cut at the end of its stem so that its suffix (which picks the data
    format) survives. Names with nothing left, `.` and `..` become `upload`.
    """
    name = (given or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(char for char in name if char.isprintable()).strip()
    if name in ("", ".", ".."):
        return "upload"
    if len(name.encode()) > _MAX_FILENAME_BYTES:
        stem, dot, suffix = name.rpartition(".")
        if not dot or len(suffix.encode()) > 16:
            stem, suffix = name, ""
        room = _MAX_FILENAME_BYTES - len(suffix.encode()) - 1
        stem = stem.encode()[:room].decode(errors="ignore")
        name = f"{stem}.{suffix}" if suffix else stem
    return name


def _owned_file(context: Context, owner: str, file_id: str) -> FileRecord:
    with context.db.read() as session:
        record = session.get(FileRecord, file_id)
    if record is None or record.owner != owner:
        raise not_found("file", file_id)
    return record


def _inspect(path: Path, filename: str) -> tuple[str, int]:
    """The data format and row count, refusing a file the training engine could not read."""
    # Inspect under the user's own file name, so that the suffix picks the format and every
    # error message names the file they uploaded.
    scratch = path.with_name(f".inspect-{path.name}")
    scratch.mkdir()
    named = scratch / filename
    os.link(path, named)
    try:
        info = inspect_file(named)
    except DataError as error:
        raise ApiError(
            400,
            f"file: {filename} is not usable training data: {error}",
            param="file",
            code="invalid_file",
        ) from error
    finally:
        named.unlink(missing_ok=True)
        scratch.rmdir()
    return info.format, info.rows


async def _store(upload: UploadFile, destination: Path, limit: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with destination.open("wb") as handle:
        while chunk := await upload.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise ApiError(
                    413,
                    f"file: the upload is larger than this server's limit of {limit} bytes "
                    "(GMNM_MAX_UPLOAD_BYTES); split the data or ask the operator to raise it.",
                    param="file",
                    code="file_too_large",
                )
            digest.update(chunk)
            handle.write(chunk)
    return size, digest.hexdigest()


def _insert(context: Context, record: FileRecord) -> None:
    with context.db.write() as session:
        session.add(record)


@router.post("", response_model=FilePublic, status_code=200)
async def create_file(
    context: Context,
    owner: Owner,
    file: UploadFile,
    purpose: Annotated[str, Form()] = "fine-tune",
) -> FilePublic:
    """Upload a data file (multipart form: `file`, `purpose`).

    JSONL, CSV and plain text files and image archives are accepted. The file is checked the
    way a job will read it; the answer gives its format, row count and sha256.
    """
    if purpose not in PURPOSES:
        raise ApiError(
            400,
            f"purpose: '{purpose}' is not accepted; use one of {', '.join(PURPOSES)}.",
            param="purpose",
        )
    filename = safe_filename(file.filename)
    file_id = new_id(FILE_PREFIX)
    path = context.layout.file_path(file_id)
    partial = path.with_name(f".{file_id}.part")
    try:
        size, sha256 = await _store(file, partial, context.settings.max_upload_bytes)
        if size == 0:
            raise ApiError(400, f"file: {filename} is empty.", param="file", code="invalid_file")
        data_format, rows = await run_in_threadpool(_inspect, partial, filename)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    record = FileRecord(
        id=file_id,
        owner=owner,
        filename=filename,
        purpose=purpose,
        bytes=size,
        sha256=sha256,
        format=data_format,
        rows=rows,
        created_at=time.time(),
    )
    try:
        # In a worker thread: waiting for the database's write lock must not stall the server.
        await run_in_threadpool(_insert, context, record)
    except BaseException:
        # Without its row the file is unreachable: remove it so a refused upload leaves nothing.
        path.unlink(missing_ok=True)
        raise
    logger.info("stored file %s (%s, %d bytes)", file_id, filename, size)
    return file_public(record)


@router.get("", response_model=Page[FilePublic])
def list_files(
    context: Context,
    owner: Owner,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    purpose: str | None = None,
) -> Page[Any]:
    """List this key's files, newest first."""
    with context.db.read() as session:
        query = select(FileRecord).where(FileRecord.owner == owner)
        if purpose is not None:
            query = query.where(FileRecord.purpose == purpose)
        if after is not None:
            anchor = session.get(FileRecord, after)
            if anchor is None or anchor.owner != owner:
                raise not_found("file", after, param="after")
            query = query.where(
                or_(
                    FileRecord.created_at < anchor.created_at,
                    and_(FileRecord.created_at == anchor.created_at, FileRecord.id < anchor.id),
                )
            )
        order = (FileRecord.created_at.desc(), FileRecord.id.desc())
        rows = list(session.scalars(query.order_by(*order).limit(limit + 1)))
    return page([file_public(row) for row in rows[:limit]], len(rows) > limit)


@router.get("/{file_id}", response_model=FilePublic)
def retrieve_file(context: Context, owner: Owner, file_id: str) -> FilePublic:
    """One file's description."""
    return file_public(_owned_file(context, owner, file_id))


@router.get("/{file_id}/content", response_class=DownloadResponse, responses=error_responses(416))
def file_content(context: Context, owner: Owner, file_id: str) -> DownloadResponse:
    """The file's bytes, as uploaded (or as the job wrote them, for result files).

    Range requests fetch part of it.
    """
    record = _owned_file(context, owner, file_id)
    return DownloadResponse(
        context.layout.file_path(record.id),
        filename=record.filename,
        headers={"ETag": f'"{record.sha256}"'},
    )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(context: Context, owner: Owner, file_id: str) -> FileDeleted:
    """Delete a file. A queued job that names it fails with `invalid_data` when it starts."""
    record = _owned_file(context, owner, file_id)
    with context.db.write() as session:
        row = session.get(FileRecord, record.id)
        if row is not None:
            session.delete(row)
    context.layout.file_path(record.id).unlink(missing_ok=True)
    return FileDeleted(id=record.id)
