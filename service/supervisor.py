"""The supervisor: claims queued jobs, runs them through an executor, and keeps the database true.

One loop, started inside `gmnm serve` or alone as `gmnm worker`, against the same database:

1. heartbeat: this worker's row and every job it runs;
2. watch each running job: copy new events and checkpoints from its output directory into the
   database, pass on cancel/pause requests (CANCEL file and SIGTERM to the process group, SIGKILL
   after the grace period), enforce the time limit, and settle the job when its process exits;
3. recover jobs whose worker stopped heartbeating (or died on this host): requeue them to resume
   from their last checkpoint, or fail them with `worker_lost` once their attempts are spent;
4. claim queued jobs while a device is free, atomically, and launch them.

Every job process is reaped, and its process group is killed when it ends, so no process of a job
outlives it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from service.db import (
    CANCELLED,
    CANCELLING,
    FAILED,
    PAUSED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    CheckpointRecord,
    Database,
    EventRecord,
    FileRecord,
    Job,
    Worker,
)
from service.executors import Executor, JobHandle, Launch, group_alive, make_executor, signal_group
from service.layout import CHECKPOINT_PREFIX, FILE_PREFIX, Layout, new_id
from service.settings import Settings
from training import protocol

logger = logging.getLogger(__name__)

# Why a running job was asked to stop; it decides the status the job ends in.
STOP_CANCEL, STOP_PAUSE, STOP_TIME_LIMIT, STOP_SHUTDOWN = (
    "cancel",
    "pause",
    "time_limit",
    "shutdown",
)

WORKER_LOST = "worker_lost"


@dataclass
class Running:
    job_id: str
    handle: JobHandle
    device: str
    out_dir: Path
    attempt_started: float
    stop_sent_at: float | None = None


def make_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{new_id('w')[2:10]}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a zombie awaiting its reaper does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc here: the signal check is all there is
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def process_belongs_to(pid: int, job_id: str) -> bool:
    """Whether process `pid` on this host was started for `job_id` (guards against pid reuse)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"GMNM_JOB_ID={job_id}".encode() in environ.split(b"\0")


def resolve_command(command: list[str]) -> list[str]:
    """Find a console script in this interpreter's environment before looking on PATH."""
    program = command[0]
    if os.sep not in program:
        beside = Path(sys.executable).parent / program
        if beside.exists():
            return [str(beside), *command[1:]]
        found = shutil.which(program)
        if found:
            return [found, *command[1:]]
    return list(command)


class Supervisor:
    """Runs jobs from the database on this host's devices."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        executor: Executor | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.db = database
        self.layout = Layout(settings.data_dir)
        self.executor = executor or make_executor(settings.executor, settings.job_niceness)
        self.worker_id = worker_id or make_worker_id()
        self.hostname = socket.gethostname()
        self.running: dict[str, Running] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_heartbeat = 0.0
        self.last_tick: float | None = None

    # lifecycle

    def start(self) -> None:
        """Run the loop in a background thread (inside the API process)."""
        self._register()
        self._thread = threading.Thread(target=self._loop, name="gmnm-supervisor", daemon=True)
        self._thread.start()

    def run_forever(self) -> None:
        """Run the loop in this thread until `stop()` (used by `gmnm worker`)."""
        self._register()
        self._loop()

    def stop(self) -> None:
        """Stop claiming; checkpoint and requeue the running jobs; return once all have ended."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def alive(self) -> bool:
        if self.last_tick is None:
            return False
        return time.time() - self.last_tick < max(10 * self.settings.poll_seconds, 10.0)

    def _loop(self) -> None:
        logger.info(
            "supervisor %s running jobs on %s (at most %d at once)",
            self.worker_id,
            ",".join(self.settings.devices),
            self.settings.concurrency,
        )
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                # A database hiccup must not kill the loop that reaps job processes.
                logger.exception("supervisor tick failed; retrying")
            self._stop.wait(self.settings.poll_seconds)
        self._shutdown()

    def tick(self) -> None:
        now = time.time()
        self.last_tick = now
        if now - self._last_heartbeat >= self.settings.heartbeat_seconds:
            self._heartbeat(now)
            self.recover_lost_jobs()
        for running in list(self.running.values()):
            self._watch(running)
        self._claim_and_launch()

    # heartbeats and recovery

    def _register(self) -> None:
        self.layout.create()
        self._last_heartbeat = 0.0
        now = time.time()
        with self.db.write() as session:
            session.add(
                Worker(
                    id=self.worker_id,
                    hostname=self.hostname,
                    pid=os.getpid(),
                    started_at=now,
                    heartbeat_at=now,
                )
            )

    def _heartbeat(self, now: float) -> None:
        with self.db.write() as session:
            session.execute(
                update(Worker).where(Worker.id == self.worker_id).values(heartbeat_at=now)
            )
            if self.running:
                session.execute(
                    update(Job)
                    .where(Job.id.in_(list(self.running)))
                    .values(heartbeat_at=now, worker_id=self.worker_id)
                )
        self._last_heartbeat = now

    def _is_lost(self, job: Job, workers: dict[str, Worker], now: float) -> bool:
        if job.worker_id is None:
            return True
        worker = workers.get(job.worker_id)
        if worker is not None and worker.hostname == self.hostname and not pid_alive(worker.pid):
            return True  # the worker died on this host: no need to wait for its heartbeat to age
        if worker is None:
            host, _, pid_text = job.worker_id.partition(":")
            pid = int(pid_text.split(":")[0]) if pid_text.split(":")[0].isdigit() else -1
            if host == self.hostname and pid > 0 and not pid_alive(pid):
                return True
        last = max(job.heartbeat_at or 0.0, worker.heartbeat_at if worker is not None else 0.0)
        return now - last > self.settings.worker_timeout_seconds

    def recover_lost_jobs(self) -> list[str]:
        """Requeue (or fail) the running jobs of workers that are gone; returns their ids."""
        now = time.time()
        recovered: list[str] = []
        with self.db.write() as session:
            workers = {worker.id: worker for worker in session.scalars(select(Worker))}
            query = select(Job).where(
                Job.status.in_((RUNNING, CANCELLING)), Job.worker_id != self.worker_id
            )
            if not self.db.is_sqlite:
                # Two workers noticing the same lost job: the second skips it.
                query = query.with_for_update(skip_locked=True)
            candidates = session.scalars(query).all()
            for job in candidates:
                if job.id in self.running or not self._is_lost(job, workers, now):
                    continue
                self._kill_orphan(job)
                self._settle_lost(session, job, now)
                recovered.append(job.id)
            stale = [
                worker.id
                for worker in workers.values()
                if worker.id != self.worker_id
                and now - worker.heartbeat_at > 10 * self.settings.worker_timeout_seconds
            ]
            if stale:
                session.execute(delete(Worker).where(Worker.id.in_(stale)))
        return recovered

    def _kill_orphan(self, job: Job) -> None:
        # A job process can outlive a worker that was killed; it must not write beside the next
        # attempt in the same directory.
        host = (job.worker_id or "").partition(":")[0]
        if job.pid and host == self.hostname and process_belongs_to(job.pid, job.id):
            logger.warning("killing orphaned process group %d of job %s", job.pid, job.id)
            signal_group(job.pid, signal.SIGKILL)
            deadline = time.time() + 5
            while group_alive(job.pid) and time.time() < deadline:
                time.sleep(0.05)

    def _settle_lost(self, session: Session, job: Job, now: float) -> None:
        self._ingest(session, job, self.layout.job_dir(job.id))
        if job.status == CANCELLING:
            status = PAUSED if job.stop_reason == STOP_PAUSE else CANCELLED
            self._finish(session, job, status, now, f"The job was {status} (its worker is gone).")
            return
        if job.attempts >= self.settings.max_attempts:
            job.error_code = WORKER_LOST
            job.error_message = (
                f"The worker running this job stopped and the job has been started "
                f"{job.attempts} times (GMNM_MAX_ATTEMPTS={self.settings.max_attempts}); "
                "resume it with POST .../resume once the cause is fixed."
            )
            self._finish(session, job, FAILED, now, job.error_message, level="error")
            return
        job.status = QUEUED
        job.resume = True
        job.worker_id = None
        job.pid = None
        job.device = None
        self._event(
            session,
            job.id,
            "The worker running this job stopped; requeued to resume from its last checkpoint.",
            level="warn",
        )
        logger.warning("job %s lost its worker; requeued (attempt %d)", job.id, job.attempts)

    # claiming and launching

    def _claim_and_launch(self) -> None:
        while not self._stop.is_set() and len(self.running) < self.settings.concurrency:
            device = self._free_device()
            if device is None:
                return
            job = self.claim(device)
            if job is None:
                return
            self._launch(job, device)

    def _free_device(self) -> str | None:
        busy = [running.device for running in self.running.values()]
        per_device = max(1, -(-self.settings.concurrency // len(self.settings.devices)))
        for device in self.settings.devices:
            if busy.count(device) < per_device:
                return device
        return None

    def claim(self, device: str) -> Job | None:
        """Take the oldest queued job for this worker, or None; no two workers get the same job."""
        with self.db.read() as session:
            if session.scalars(select(Job.id).where(Job.status == QUEUED).limit(1)).first() is None:
                return None
        with self.db.write() as session:
            query = select(Job).where(Job.status == QUEUED).order_by(Job.created_at, Job.id)
            if not self.db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            job = session.scalars(query.limit(1)).first()
            if job is None:
                return None
            now = time.time()
            job.status = RUNNING
            job.worker_id = self.worker_id
            job.device = device
            job.attempts += 1
            job.started_at = job.started_at or now
            job.heartbeat_at = now
            job.stop_reason = None
            job.stop_requested_at = None
            job.progress = {**(job.progress or {}), "attempt_started": now}
            self._event(session, job.id, f"Job started on {device} (attempt {job.attempts}).")
            session.flush()
            session.expunge(job)
            return job

    def _launch(self, job: Job, device: str) -> None:
        out_dir = self.layout.job_dir(job.id)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / protocol.CANCEL_FILE).unlink(missing_ok=True)
        spec_path = out_dir / protocol.SPEC_FILE
        spec = {**job.spec, "device": spec_device(job.spec.get("device", "auto"), device)}
        spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True))
        command = resolve_command(self.settings.job_commands[job.kind])
        command += ["--spec", str(spec_path), "--out", str(out_dir)]
        if job.resume and latest_checkpoint_dir(out_dir) is not None:
            command.append("--resume")
        launch = Launch(job.id, command, out_dir, device, env={"GMNM_JOB_ID": job.id})
        try:
            handle = self.executor.launch(launch)
        except OSError as error:
            with self.db.write() as session:
                record = session.get(Job, job.id)
                assert record is not None
                record.error_code = "internal_error"
                record.error_message = (
                    f"Could not start the job program {command[0]!r}: {error}. Check that the "
                    "project is installed in the server's environment (GMNM_JOB_COMMANDS)."
                )
                self._finish(session, record, FAILED, time.time(), record.error_message, "error")
            return
        self.running[job.id] = Running(job.id, handle, device, out_dir, time.time())
        with self.db.write() as session:
            session.execute(update(Job).where(Job.id == job.id).values(pid=handle.pid))

    # watching running jobs

    def _watch(self, running: Running) -> None:
        exit_status = running.handle.poll()
        now = time.time()
        with self.db.write() as session:
            job = session.get(Job, running.job_id)
            if job is None:  # deleted under us
                running.handle.kill()
                self.running.pop(running.job_id, None)
                return
            self._ingest(session, job, running.out_dir)
            if exit_status is not None:
                self._settle_exit(session, job, running, exit_status, now)
                return
            limit = self.settings.max_job_minutes * 60
            if job.status == RUNNING and now - running.attempt_started > limit:
                job.status = CANCELLING
                job.stop_reason = STOP_TIME_LIMIT
                job.stop_requested_at = now
            if job.status == CANCELLING:
                self._pass_on_stop(running, now)

    def _pass_on_stop(self, running: Running, now: float) -> None:
        if running.stop_sent_at is None:
            (running.out_dir / protocol.CANCEL_FILE).touch()
            running.handle.terminate()
            running.stop_sent_at = now
            logger.info("job %s asked to stop (SIGTERM to its process group)", running.job_id)
        elif now - running.stop_sent_at > self.settings.cancel_grace_seconds:
            logger.warning(
                "job %s still running %.0f s after SIGTERM; sending SIGKILL",
                running.job_id,
                now - running.stop_sent_at,
            )
            running.handle.kill()

    def _settle_exit(
        self, session: Session, job: Job, running: Running, exit_status: int, now: float
    ) -> None:
        # Children a job started (data loader workers) die with it.
        running.handle.kill()
        self.running.pop(job.id, None)
        out_dir = running.out_dir
        job.pid = None
        if job.status == CANCELLING:
            self._settle_stop(session, job, exit_status, now)
        elif exit_status == protocol.EXIT_OK:
            self._settle_success(session, job, out_dir, now)
        else:
            self._settle_failure(session, job, out_dir, exit_status, now)

    def _settle_stop(self, session: Session, job: Job, exit_status: int, now: float) -> None:
        reason = job.stop_reason or STOP_CANCEL
        if reason == STOP_SHUTDOWN:
            job.status = QUEUED
            job.resume = True
            job.worker_id = None
            job.device = None
            job.attempts = max(0, job.attempts - 1)  # a clean stop does not use up an attempt
            self._event(session, job.id, "Server stopping: checkpointed and requeued.")
            return
        if reason == STOP_TIME_LIMIT:
            job.error_code = "time_limit_exceeded"
            job.error_message = (
                f"The job ran longer than GMNM_MAX_JOB_MINUTES={self.settings.max_job_minutes:g} "
                "minutes and was stopped after a checkpoint; resume it to continue."
            )
            self._finish(session, job, FAILED, now, job.error_message, level="error")
            return
        status = PAUSED if reason == STOP_PAUSE else CANCELLED
        how = "after a checkpoint" if exit_status == protocol.EXIT_CANCELLED else "forcibly"
        self._finish(session, job, status, now, f"Job {status} ({how}).")

    def _settle_success(self, session: Session, job: Job, out_dir: Path, now: float) -> None:
        result = read_json(out_dir / protocol.RESULT_FILE)
        metrics = read_json(out_dir / protocol.METRICS_FILE)
        job.result = result if isinstance(result, dict) else None
        if isinstance(metrics, dict):
            job.metrics = metrics
        if job.kind == "fine_tune":
            results_file = self._write_results_file(session, job)
            if results_file is not None:
                job.result_files = [results_file]
        self._finish(session, job, SUCCEEDED, now, "The job has successfully completed.")

    def _settle_failure(
        self, session: Session, job: Job, out_dir: Path, exit_status: int, now: float
    ) -> None:
        error = read_json(out_dir / protocol.ERROR_FILE)
        if isinstance(error, dict) and error.get("message"):
            job.error_code = str(error.get("code") or "internal_error")
            job.error_message = str(error["message"])
            job.error_param = error.get("param")
        elif exit_status < 0:
            name = signal.Signals(-exit_status).name
            job.error_code = "process_killed"
            job.error_message = (
                f"The job process was killed by {name} without writing an error (for SIGKILL, "
                "often the host running out of memory: lower batch_size)."
            )
        else:
            job.error_code = "internal_error"
            job.error_message = (
                f"The job process exited with status {exit_status} without writing error.json; "
                f"its log is {out_dir / 'job.log'} on the worker."
            )
        self._finish(session, job, FAILED, now, f"Job failed: {job.error_message}", "error")

    def _finish(
        self,
        session: Session,
        job: Job,
        status: str,
        now: float,
        message: str,
        level: str = "info",
    ) -> None:
        job.status = status
        job.finished_at = now
        job.pid = None
        job.stop_requested_at = None
        self._event(session, job.id, message, level=level)
        logger.info("job %s %s", job.id, status)

    # copying a job's output into the database

    def _ingest(self, session: Session, job: Job, out_dir: Path) -> None:
        self._ingest_events(session, job, out_dir / protocol.EVENTS_FILE)
        self._ingest_checkpoints(session, job, out_dir / protocol.CHECKPOINTS_DIR)

    def _ingest_events(self, session: Session, job: Job, path: Path) -> None:
        try:
            with path.open("rb") as handle:
                handle.seek(job.events_offset)
                chunk = handle.read()
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n")
        if end < 0:
            return  # no complete line yet
        for line in chunk[: end + 1].splitlines():
            if line.strip():
                self._ingest_event_line(session, job, line)
        job.events_offset += end + 1

    def _ingest_event_line(self, session: Session, job: Job, line: bytes) -> None:
        try:
            raw = json.loads(line)
            if not isinstance(raw, dict):
                raise ValueError("not an object")
        except ValueError:
            logger.warning("job %s wrote an unreadable event line: %.200r", job.id, line)
            return
        kind = raw.get("type", protocol.EVENT_MESSAGE)
        step = raw.get("step") if isinstance(raw.get("step"), int) else None
        skip = ("type", "time", "message", "level")
        data = {key: value for key, value in raw.items() if key not in skip and value is not None}
        created = float(raw.get("time") or time.time())
        message = str(raw.get("message") or "")
        if kind == protocol.EVENT_METRICS:
            values: dict[str, Any] = raw["values"] if isinstance(raw.get("values"), dict) else {}
            self._record_progress(job, raw, values, created)
            if not message:
                shown = ", ".join(f"{name}={_short(value)}" for name, value in values.items())
                message = f"Step {step}: {shown}" if step is not None else shown
        level = raw.get("level") if raw.get("level") in ("info", "warn", "error") else "info"
        session.add(
            EventRecord(
                job_id=job.id,
                created_at=created,
                level=level,
                type=kind
                if kind in (protocol.EVENT_METRICS, protocol.EVENT_MESSAGE)
                else "message",
                message=message,
                step=step,
                data=data or None,
            )
        )

    def _record_progress(
        self, job: Job, raw: dict[str, Any], values: dict[str, Any], created: float
    ) -> None:
        progress = dict(job.progress or {})
        for key in ("step", "total_steps", "epoch"):
            if raw.get(key) is not None:
                progress[key] = raw[key]
        if raw.get("step") is not None:
            # The rate for the finish estimate is measured within the current attempt.
            if progress.get("rate_from_time", 0.0) < progress.get("attempt_started", 0.0):
                progress["rate_from_time"] = created
                progress["rate_from_step"] = raw["step"]
            progress["time"] = created
        job.progress = progress
        job.metrics = {**(job.metrics or {}), **values}
        tokens = values.get("trained_tokens", values.get("tokens"))
        if isinstance(tokens, int | float):
            job.trained_tokens = max(int(tokens), job.trained_tokens or 0)

    def _ingest_checkpoints(self, session: Session, job: Job, directory: Path) -> None:
        if not directory.is_dir():
            return
        known = set(
            session.scalars(select(CheckpointRecord.step).where(CheckpointRecord.job_id == job.id))
        )
        for path in sorted(directory.glob(f"{protocol.CHECKPOINT_PREFIX}*")):
            step_text = path.name.removeprefix(protocol.CHECKPOINT_PREFIX)
            info_path = path / protocol.CHECKPOINT_INFO_FILE
            if not step_text.isdigit() or int(step_text) in known or not info_path.is_file():
                continue
            info = read_json(info_path)
            info = info if isinstance(info, dict) else {}
            metrics = info.get("metrics") if isinstance(info.get("metrics"), dict) else None
            session.add(
                CheckpointRecord(
                    id=new_id(CHECKPOINT_PREFIX),
                    job_id=job.id,
                    owner=job.owner,
                    step=int(step_text),
                    path=str(path.relative_to(self.layout.root)),
                    metrics=metrics,
                    created_at=float(info.get("created_at") or time.time()),
                )
            )
        session.flush()

    def _write_results_file(self, session: Session, job: Job) -> str | None:
        """A CSV of every metrics event, listed in `result_files` as OpenAI's clients expect."""
        events = session.scalars(
            select(EventRecord)
            .where(EventRecord.job_id == job.id, EventRecord.type == protocol.EVENT_METRICS)
            .order_by(EventRecord.seq)
        ).all()
        if not events:
            return None
        rows = [
            {"step": event.step, **((event.data or {}).get("values") or {})} for event in events
        ]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        content = buffer.getvalue().encode()
        file_id = new_id(FILE_PREFIX)
        self.layout.file_path(file_id).write_bytes(content)
        session.add(
            FileRecord(
                id=file_id,
                owner=job.owner,
                filename="step_metrics.csv",
                purpose="fine-tune-results",
                bytes=len(content),
                sha256=hashlib.sha256(content).hexdigest(),
                format="csv",
                rows=len(rows),
                created_at=time.time(),
            )
        )
        return file_id

    def _event(self, session: Session, job_id: str, message: str, level: str = "info") -> None:
        session.add(
            EventRecord(
                job_id=job_id,
                created_at=time.time(),
                level=level,
                type=protocol.EVENT_MESSAGE,
                message=message,
                step=None,
                data=None,
            )
        )

    # shutting down

    def _shutdown(self) -> None:
        if self.running:
            logger.info("stopping %d running job(s) to checkpoint and requeue", len(self.running))
            with self.db.write() as session:
                for job_id in self.running:
                    session.execute(
                        update(Job)
                        .where(Job.id == job_id, Job.status == RUNNING)
                        .values(status=CANCELLING, stop_reason=STOP_SHUTDOWN)
                    )
        now = time.time()
        deadline = now + self.settings.cancel_grace_seconds
        for running in self.running.values():
            self._pass_on_stop(running, now)
        while self.running and time.time() < deadline:
            for running in list(self.running.values()):
                self._watch(running)
            time.sleep(0.05)
        for running in list(self.running.values()):
            running.handle.kill()
        while self.running:
            for running in list(self.running.values()):
                self._watch(running)
            time.sleep(0.05)
        with self.db.write() as session:
            session.execute(delete(Worker).where(Worker.id == self.worker_id))
        logger.info("supervisor %s stopped", self.worker_id)


def spec_device(requested: str, assigned: str) -> str:
    """The device a job's spec names: its process sees only the assigned GPU, as `cuda`."""
    if requested == "cpu" or assigned == "cpu":
        return "cpu" if requested in ("cpu", "auto") else requested
    return "cuda"


def latest_checkpoint_dir(out_dir: Path) -> Path | None:
    directory = out_dir / protocol.CHECKPOINTS_DIR
    if not directory.is_dir():
        return None
    steps = [
        (int(path.name.removeprefix(protocol.CHECKPOINT_PREFIX)), path)
        for path in directory.glob(f"{protocol.CHECKPOINT_PREFIX}*")
        if path.name.removeprefix(protocol.CHECKPOINT_PREFIX).isdigit()
        and (path / protocol.CHECKPOINT_INFO_FILE).is_file()
    ]
    return max(steps)[1] if steps else None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
