"""The supervisor: claims queued jobs, runs them through an executor, and keeps the database true.

One loop, started inside `gmnm serve` or alone as `gmnm worker`, against the same database:

1. heartbeat: this worker's row and every job it runs, stamped with the database's clock;
2. watch each running job: copy new events and checkpoints from its output directory into the
   database, pass on cancel/pause requests (CANCEL file and SIGTERM to the process group, SIGKILL
   after the grace period), enforce the time limit, and settle the job when its process exits;
3. recover jobs whose worker stopped heartbeating (or died on this host): requeue them to resume
   from their last checkpoint, or fail them with `worker_lost` once their attempts are spent.
   A heartbeat's age is measured on the database's clock too, so hosts whose clocks disagree
   never take each other for dead;
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
import math
import os
import signal
import socket
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
from service.executors import (
    Executor,
    ExecutorUnavailableError,
    JobHandle,
    Launch,
    describe_devices,
    group_alive,
    job_processes,
    make_executor,
    process_belongs_to,
    signal_group,
)
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
# Queued jobs looked at per claim, oldest first.
CLAIM_WINDOW = 50
# How long a worker waits before launching again after its executor could not take a job.
EXECUTOR_RETRY_SECONDS = 10.0


@dataclass
class Running:
    job_id: str
    handle: JobHandle
    device: str
    out_dir: Path
    attempt_started: float
    stop_sent_at: float | None = None
    # Indices into the worker's device slots that this job holds.
    slots: tuple[int, ...] = ()
    # Submitted to a Ray cluster that has not started it yet.
    waiting: bool = False


def make_worker_id(hostname: str | None = None) -> str:
    return f"{hostname or socket.gethostname()}:{os.getpid()}:{new_id('w')[2:10]}"


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
        self.executor = executor or make_executor(settings)
        self.hostname = settings.worker_hostname
        self.worker_id = worker_id or make_worker_id(self.hostname)
        # The device slots jobs are placed on: this host's devices, or on a Ray cluster (which
        # places the processes itself) one slot per job this worker may have submitted at once.
        self.slots = (
            list(settings.devices)
            if settings.executor == "local"
            else ["ray"] * settings.concurrency
        )
        self.running: dict[str, Running] = {}
        self._told_waiting: set[str] = set()
        self._executor_retry_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # When this worker last sent its heartbeat, on this host's monotonic clock.
        self._last_heartbeat = -math.inf
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
        self.last_tick = time.time()
        # Paced by the monotonic clock: a wall clock set back would silence the heartbeat until
        # it caught up, and other workers would take this one for dead.
        if time.monotonic() - self._last_heartbeat >= self.settings.heartbeat_seconds:
            self._heartbeat()
            self.recover_lost_jobs()
        for running in list(self.running.values()):
            self._watch(running)
        self._claim_and_launch()

    # heartbeats and recovery

    def _register(self) -> None:
        self.layout.create()
        self._last_heartbeat = -math.inf
        with self.db.write() as session:
            now = self.db.clock(session)
            session.add(
                Worker(
                    id=self.worker_id,
                    hostname=self.hostname,
                    pid=os.getpid(),
                    started_at=now,
                    heartbeat_at=now,
                )
            )

    def _heartbeat(self) -> None:
        with self.db.write() as session:
            now = self.db.clock(session)
            beat = session.execute(
                update(Worker).where(Worker.id == self.worker_id).values(heartbeat_at=now)
            )
            if beat.rowcount == 0:  # type: ignore[attr-defined]
                # Another worker took this one for dead (it was silent too long) and removed it.
                logger.warning("worker %s was presumed dead; registering again", self.worker_id)
                session.add(
                    Worker(
                        id=self.worker_id,
                        hostname=self.hostname,
                        pid=os.getpid(),
                        started_at=now,
                        heartbeat_at=now,
                    )
                )
            if self.running:
                # Only jobs still held: one requeued while this worker was silent is another's.
                session.execute(
                    update(Job)
                    .where(Job.id.in_(list(self.running)), Job.worker_id == self.worker_id)
                    .values(heartbeat_at=now)
                )
        self._last_heartbeat = time.monotonic()

    def _is_lost(self, job: Job, workers: dict[str, Worker], now: float) -> bool:
        """Whether the job's worker is gone; `now` is the database's clock, as the heartbeats."""
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
        recovered: list[str] = []
        with self.db.write() as session:
            now = self.db.clock(session)
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
                self._settle_lost(session, job, time.time())
                if job.status != QUEUED:
                    self.executor.stop_lost(job.id)
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
        # attempt in the same directory. torchrun's ranks lead sessions of their own, so every
        # process carrying the job's id is found, not only the job's process group.
        host = (job.worker_id or "").partition(":")[0]
        if not job.pid or host != self.hostname:
            return
        groups = {job.pid} if process_belongs_to(job.pid, job.id) else set()
        for pid in job_processes(job.id):
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                continue  # it ended meanwhile
        for group in sorted(groups):
            logger.warning("killing orphaned process group %d of job %s", group, job.id)
            signal_group(group, signal.SIGKILL)
        deadline = time.time() + 5
        while any(group_alive(group) for group in groups) and time.time() < deadline:
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
        self._requeue(
            session,
            job,
            "The worker running this job stopped; requeued to resume from its last checkpoint.",
        )

    def _requeue(self, session: Session, job: Job, message: str) -> None:
        """Queue a job whose attempt ended abnormally to continue from its newest checkpoint."""
        job.status = QUEUED
        job.resume = True
        job.worker_id = None
        job.pid = None
        job.device = None
        self._event(session, job.id, message, level="warn")
        logger.warning("job %s requeued after attempt %d: %s", job.id, job.attempts, message)

    # claiming and launching

    def _claim_and_launch(self) -> None:
        while not self._stop.is_set() and len(self.running) < self.settings.concurrency:
            if time.time() < self._executor_retry_at:
                return
            free = self._free_slots()
            if not free:
                return
            claimed = self._claim(free)
            if claimed is None:
                return
            self._launch(*claimed)

    def _free_slots(self) -> list[int]:
        """Indices of the device slots that can take one more job process."""
        per_slot = max(1, -(-self.settings.concurrency // len(self.slots)))
        held = [slot for running in self.running.values() for slot in running.slots]
        return [index for index in range(len(self.slots)) if held.count(index) < per_slot]

    def slots_needed(self, kind: str, spec: dict[str, Any]) -> int:
        """Device slots a job takes: one per process on a local host; one on a Ray cluster,
        which places the processes itself."""
        if self.settings.executor == "ray":
            return 1
        return processes_of(kind, spec)

    def pick_slots(self, free: list[int], need: int) -> list[int] | None:
        """`need` of the `free` slots, all of one kind (CPU or GPU), or None if they do not
        have that many."""
        by_kind: dict[str, list[int]] = {}
        for index in free:
            by_kind.setdefault(self.slots[index].partition(":")[0], []).append(index)
        for indices in by_kind.values():
            if len(indices) >= need:
                return indices[:need]
        return None

    def claim(self, device: str | None = None) -> Job | None:
        """Take the oldest queued job this worker can run now, or None; no two workers get the
        same job. (`device` is accepted for callers that name one; the free slots decide.)"""
        claimed = self._claim(self._free_slots())
        return None if claimed is None else claimed[0]

    def _claim(self, free: list[int]) -> tuple[Job, list[int]] | None:
        """First come, first served: the oldest queued job this worker could ever place is
        claimed when its devices are free, and younger jobs wait behind it rather than take the
        devices it waits for. A job needing more devices than this worker has is left for
        another worker."""
        with self.db.read() as session:
            queued = session.execute(
                select(Job.id, Job.kind, Job.spec)
                .where(Job.status == QUEUED)
                .order_by(Job.created_at, Job.id)
                .limit(CLAIM_WINDOW)
            ).all()
        everything = list(range(len(self.slots)))
        for job_id, kind, spec in queued:
            need = self.slots_needed(kind, spec or {})
            if self.pick_slots(everything, need) is None:
                self._tell_waiting(job_id, need)
                continue
            chosen = self.pick_slots(free, need)
            if chosen is None:
                return None
            job = self._take(job_id, chosen)
            if job is not None:
                return job, chosen
        return None

    def _take(self, job_id: str, chosen: list[int]) -> Job | None:
        """Mark a queued job as running here, unless another worker got it first."""
        with self.db.write() as session:
            query = select(Job).where(Job.id == job_id, Job.status == QUEUED)
            if not self.db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            job = session.scalars(query).first()
            if job is None:
                return None
            now = time.time()
            device = describe_devices([self.slots[index] for index in chosen])
            job.status = RUNNING
            job.worker_id = self.worker_id
            job.device = device
            job.attempts += 1
            job.started_at = job.started_at or now
            job.heartbeat_at = self.db.clock(session)
            job.stop_reason = None
            job.stop_requested_at = None
            # The finish estimate waits for this attempt's own rate: an earlier one's says
            # nothing about how long this one has spent starting up or will take per step.
            progress = dict(job.progress or {})
            for key in ("rate_from_time", "rate_from_step"):
                progress.pop(key, None)
            job.progress = {**progress, "attempt_started": now}
            self._event(session, job.id, f"Job started on {device} (attempt {job.attempts}).")
            session.flush()
            session.expunge(job)
            return job

    def _tell_waiting(self, job_id: str, need: int) -> None:
        if job_id in self._told_waiting:
            return
        self._told_waiting.add(job_id)
        devices = ",".join(self.settings.devices)
        message = (
            f"Waiting for a worker with {need} devices of one kind: worker {self.worker_id} has "
            f"{len(self.slots)} (GMNM_DEVICES={devices}). List more devices there, or lower "
            "hyperparameters.num_processes."
        )
        logger.warning("job %s: %s", job_id, message)
        with self.db.write() as session:
            self._event(session, job_id, message, level="warn")

    def _launch(self, job: Job, chosen: list[int]) -> None:
        out_dir = self.layout.job_dir(job.id)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / protocol.CANCEL_FILE).unlink(missing_ok=True)
        (out_dir / protocol.ERROR_FILE).unlink(missing_ok=True)
        devices = [self.slots[index] for index in chosen]
        requested = job.spec.get("device", "auto")
        if self.settings.executor == "ray":
            devices = [ray_spec_device(requested, self.settings.ray_gpus_per_process)]
        spec = {**job.spec, "device": spec_device(requested, devices[0])}
        spec_path = out_dir / protocol.SPEC_FILE
        spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True))
        arguments = ["--spec", str(spec_path), "--out", str(out_dir)]
        if job.resume and latest_checkpoint_dir(out_dir) is not None:
            arguments.append("--resume")
        launch = Launch(
            job_id=job.id,
            kind=job.kind,
            program=list(self.settings.job_commands[job.kind]),
            arguments=arguments,
            out_dir=out_dir,
            devices=devices,
            num_processes=processes_of(job.kind, job.spec),
            num_nodes=requested_nodes(job.request),
            env={"GMNM_JOB_ID": job.id},
        )
        try:
            handle = self.executor.launch(launch)
        except ExecutorUnavailableError as error:
            self._requeue_untried(job.id, str(error))
            return
        except OSError as error:
            with self.db.write() as session:
                record = session.get(Job, job.id)
                assert record is not None
                record.error_code = "internal_error"
                record.error_message = (
                    f"Could not start the job program {launch.program[0]!r}: {error}. Check that "
                    "the project is installed in the server's environment (GMNM_JOB_COMMANDS)."
                )
                self._finish(session, record, FAILED, time.time(), record.error_message, "error")
            return
        self.running[job.id] = Running(
            job.id, handle, job.device or devices[0], out_dir, time.time(), slots=tuple(chosen)
        )
        with self.db.write() as session:
            session.execute(update(Job).where(Job.id == job.id).values(pid=handle.pid))

    def _requeue_untried(self, job_id: str, reason: str) -> None:
        """Put back a job the executor could not take; it keeps its attempt."""
        logger.warning("job %s could not be started (%s); it stays queued", job_id, reason)
        self._executor_retry_at = time.time() + EXECUTOR_RETRY_SECONDS
        with self.db.write() as session:
            record = session.get(Job, job_id)
            if record is None or record.status != RUNNING:
                return
            record.status = QUEUED
            record.worker_id = None
            record.device = None
            record.attempts = max(0, record.attempts - 1)
            if job_id not in self._told_waiting:
                self._told_waiting.add(job_id)
                self._event(session, job_id, f"Not started yet: {reason}; retrying.", level="warn")

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
            if job.worker_id != self.worker_id:
                self._let_go(running)
                return
            self._ingest(session, job, running.out_dir)
            if exit_status is not None:
                self._settle_exit(session, job, running, exit_status, now)
                return
            self._note_waiting(session, running, now)
            limit = self.settings.max_job_minutes * 60
            overdue = not running.waiting and now - running.attempt_started > limit
            if job.status == RUNNING and overdue:
                job.status = CANCELLING
                job.stop_reason = STOP_TIME_LIMIT
                job.stop_requested_at = now
            if job.status == CANCELLING:
                self._pass_on_stop(running, now)

    def _note_waiting(self, session: Session, running: Running, now: float) -> None:
        """Tell the user when a job waits on its Ray cluster for resources, and when it starts
        there; its time limit counts from then, since a job the cluster has not started yet has
        not run."""
        waiting = running.handle.waiting
        if waiting == running.waiting:
            return
        running.waiting = waiting
        if waiting:
            self._event(
                session,
                running.job_id,
                "Submitted and waiting on the Ray cluster for the CPUs or GPUs the job asks for; "
                "its time limit (GMNM_MAX_JOB_MINUTES) starts when the cluster starts it.",
            )
            return
        self._event(
            session,
            running.job_id,
            f"Started running on the Ray cluster after waiting "
            f"{now - running.attempt_started:.0f} s for its resources.",
        )
        running.attempt_started = now

    def _let_go(self, running: Running) -> None:
        """Drop a job another worker requeued while this one was silent (a pause, a lost
        database connection): its attempt here must not write beside the next one. A job that
        runs elsewhere (on a Ray cluster) is the same job the new worker watches, so it is left
        running."""
        logger.warning(
            "job %s was taken over by another worker while this one was silent; %s",
            running.job_id,
            "stopping this attempt" if running.handle.pid else "no longer watching it",
        )
        if running.handle.pid:
            running.handle.kill()
        self.running.pop(running.job_id, None)

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
            if job.attempts < self.settings.max_attempts:
                # Killed from outside (the kernel's out-of-memory killer, an operator, a host
                # being reclaimed): the next attempt continues from the newest checkpoint.
                self._requeue(
                    session,
                    job,
                    f"The job process was killed by {name}; requeued to resume from its last "
                    f"checkpoint (attempt {job.attempts} of {self.settings.max_attempts}).",
                )
                return
            job.error_code = "process_killed"
            job.error_message = (
                f"The job process was killed by {name} without writing an error, and the job "
                f"has been started {job.attempts} times (GMNM_MAX_ATTEMPTS="
                f"{self.settings.max_attempts}); for SIGKILL the cause is often the host running "
                "out of memory: lower batch_size, then resume it with POST .../resume."
            )
        else:
            job.error_code = "internal_error"
            job.error_message = (
                f"The job process exited with status {exit_status} without writing error.json; "
                f"its log is {(out_dir / 'job.log').relative_to(self.layout.root)} in the "
                "worker's data directory (ask the operator)."
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
    """The device a job's spec names: its processes see only their assigned GPUs, as `cuda`."""
    if requested == "cpu" or assigned == "cpu":
        return "cpu" if requested in ("cpu", "auto") else requested
    return "cuda"


def ray_spec_device(requested: str, gpus_per_process: float) -> str:
    """The device of a job on a Ray cluster: a GPU when the worker asks Ray for GPUs
    (GMNM_RAY_GPUS_PER_PROCESS) and the job did not ask for the CPU."""
    if requested == "cpu" or (requested == "auto" and not gpus_per_process):
        return "cpu"
    return "cuda"


def requested_nodes(request: dict[str, Any]) -> int:
    """The nodes a fine-tune request asks to spread over (`hyperparameters.num_nodes`, Ray
    clusters only), read as the spec builder reads the hyperparameters."""
    hyperparameters = request.get("hyperparameters") or {}
    supervised = (request.get("method") or {}).get("supervised") or {}
    hyperparameters = supervised.get("hyperparameters") or hyperparameters
    value = hyperparameters.get("num_nodes", 1)
    return value if isinstance(value, int) and value >= 1 else 1


def processes_of(kind: str, spec: dict[str, Any]) -> int:
    """The processes a job runs: a fine-tune's `num_processes`, else one."""
    if kind != "fine_tune":
        return 1
    hyperparameters = spec.get("hyperparameters") or {}
    return max(1, int(hyperparameters.get("num_processes") or 1))


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
