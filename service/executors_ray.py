"""Jobs on a Ray cluster through the Ray Jobs API (`GMNM_EXECUTOR=ray`, `GMNM_RAY_ADDRESS`).

Each attempt of a job is one Ray job whose submission id is the service's job id. A one-process
job runs the same program as on a local worker (`gmnm-train --spec ... --out ...`) as the Ray
job's entry point, with its GPU as an entry-point resource; a data-parallel fine-tune
(`num_processes > 1` or `num_nodes > 1`) runs `python -m service.ray_train`, which starts the
same training loop on Ray Train workers. The job writes events and checkpoints to the data
directory, which every Ray node mounts at the same path, and the supervisor reads them there as
it does for a local job.

Ray's job statuses map onto the service's: PENDING (submitted, but the cluster has not yet found
the CPUs or GPUs the job asks for) is a running job that is `waiting`; the supervisor says so in
an event and starts the job's time limit only when Ray starts it. The job stays `running` rather
than `queued`: it holds this worker's submission, which a cancel must stop on the cluster, and
no other worker may claim it. RUNNING is a running job; SUCCEEDED is EXIT_OK; FAILED is the entry
point's exit status (error.json written here from Ray's message when the program wrote none);
STOPPED after the service's `stop_job` is EXIT_CANCELLED when the newest checkpoint holds the
last step trained (else a forced stop). Ray sends SIGTERM on `stop_job` and SIGKILL after
`RAY_JOB_STOP_WAIT_TIME_S` (an environment variable of the cluster's nodes).

The service only calls the Jobs API; Ray's dashboard is never proxied or exposed by it. With
token authentication on the cluster (`RAY_AUTH_MODE=token`), give the token with
GMNM_RAY_AUTH_TOKEN or GMNM_RAY_AUTH_TOKEN_FILE.
"""

from __future__ import annotations

import json
import logging
import shlex
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.executors import ExecutorUnavailableError, Launch
from training import protocol

if TYPE_CHECKING:
    from service.settings import Settings

logger = logging.getLogger(__name__)

# The program a data-parallel fine-tune runs as its Ray job's entry point.
RAY_TRAIN_PROGRAM = ["python", "-m", "service.ray_train"]
# How often one job's status is asked of the cluster at most.
STATUS_INTERVAL_SECONDS = 1.0


class RayJobHandle:
    """One submitted Ray job, seen through the Jobs API."""

    pid = 0  # nothing of it runs on this host

    def __init__(self, client: Any, submission_id: str, out_dir: Path) -> None:
        self.client = client
        self.submission_id = submission_id
        self.out_dir = out_dir
        self._status: int | None = None
        self._asked_at = 0.0
        self._stop_requested = False
        # Whether Ray last reported the job PENDING: not started yet for want of resources (or
        # while its runtime environment is set up).
        self.waiting = False

    def poll(self) -> int | None:
        if self._status is not None:
            return self._status
        now = time.monotonic()
        if now - self._asked_at < STATUS_INTERVAL_SECONDS:
            return None
        self._asked_at = now
        try:
            info = self.client.get_job_info(self.submission_id)
        except (RuntimeError, OSError) as error:
            if "does not exist" in str(error):
                self._status = self._fail(
                    "worker_lost",
                    f"The Ray cluster no longer knows job {self.submission_id} (was its head "
                    "restarted?); resume the job to run it again from its last checkpoint.",
                )
                return self._status
            logger.warning("could not ask Ray about job %s: %s", self.submission_id, error)
            return None
        if not info.status.is_terminal():
            self.waiting = str(info.status) == "PENDING"
            return None
        self.waiting = False
        self._status = self._exit_status(info)
        self._save_logs()
        return self._status

    def _exit_status(self, info: Any) -> int:
        status = str(info.status)
        if status == "SUCCEEDED":
            return protocol.EXIT_OK
        if status == "STOPPED" and not self._stop_requested:
            return self._fail(
                "internal_error",
                f"The Ray job {self.submission_id} was stopped on the cluster, not through this "
                "service; resume the job to continue from its last checkpoint.",
            )
        if status == "STOPPED":
            if _stopped_with_checkpoint(self.out_dir):
                return protocol.EXIT_CANCELLED
            return -int(signal.SIGKILL)
        code = info.driver_exit_code
        if (self.out_dir / protocol.ERROR_FILE).exists():
            return int(code) if code else protocol.EXIT_FAILED
        message = (info.message or "").strip()
        return self._fail(
            "internal_error",
            f"The Ray job {self.submission_id} failed without the job writing why: "
            f"{message[-2000:] or 'Ray gave no message'}",
        )

    def _fail(self, code: str, message: str) -> int:
        error = {"code": code, "message": message}
        (self.out_dir / protocol.ERROR_FILE).write_text(json.dumps(error))
        return protocol.EXIT_FAILED

    def _save_logs(self) -> None:
        # The driver's output lives in the cluster; keep a copy where a local job's log would be.
        try:
            logs = self.client.get_job_logs(self.submission_id)
        except (RuntimeError, OSError) as error:
            logger.warning("could not fetch the logs of Ray job %s: %s", self.submission_id, error)
            return
        (self.out_dir / "job.log").write_text(logs)

    def terminate(self) -> None:
        self._stop()

    def kill(self) -> None:
        # The Jobs API has no immediate kill: Ray escalates to SIGKILL itself after its wait.
        if self._status is None:
            self._stop()

    def _stop(self) -> None:
        self._stop_requested = True
        try:
            self.client.stop_job(self.submission_id)
        except (RuntimeError, OSError) as error:
            logger.warning("could not stop Ray job %s: %s", self.submission_id, error)


def _stopped_with_checkpoint(out_dir: Path) -> bool:
    """Whether the job's newest checkpoint holds its last training step: what the engine leaves
    when it stops on SIGTERM, and not what a SIGKILL in mid-step leaves."""
    checkpoints = [
        int(path.name.removeprefix(protocol.CHECKPOINT_PREFIX))
        for path in (out_dir / protocol.CHECKPOINTS_DIR).glob(f"{protocol.CHECKPOINT_PREFIX}*")
        if path.name.removeprefix(protocol.CHECKPOINT_PREFIX).isdigit()
        and (path / protocol.CHECKPOINT_INFO_FILE).is_file()
    ]
    if not checkpoints:
        return False
    return max(checkpoints) >= _last_event_step(out_dir / protocol.EVENTS_FILE)


def _last_event_step(path: Path, tail_bytes: int = 65536) -> int:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - tail_bytes))
            lines = handle.read().splitlines()
    except OSError:
        return 0
    steps = [0]
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # the first line of the tail may be cut
        if isinstance(event, dict) and isinstance(event.get("step"), int):
            steps.append(event["step"])
    return max(steps)


class RayExecutor:
    """Submits jobs to the Ray cluster at `address` and watches them."""

    def __init__(self, address: str, token: str | None = None, gpus_per_process: float = 0.0):
        self.address = address
        self.token = token
        self.gpus_per_process = gpus_per_process
        self._client: Any = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RayExecutor:
        assert settings.ray_address is not None  # the settings refuse ray without an address
        return cls(settings.ray_address, settings.ray_token(), settings.ray_gpus_per_process)

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                from ray.job_submission import JobSubmissionClient
            except ImportError as error:
                raise ExecutorUnavailableError(
                    "GMNM_EXECUTOR=ray needs Ray on the service's workers: "
                    "pip install 'gmnm-surgery[ray]'"
                ) from error
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
            self._client = JobSubmissionClient(self.address, headers=headers)
        return self._client

    def launch(self, launch: Launch) -> RayJobHandle:
        submission_id = launch.job_id
        try:
            handle = self._adopt_or_clear(submission_id, launch.out_dir)
            if handle is not None:
                return handle
            self.client.submit_job(**self.submission(launch))
        except ExecutorUnavailableError:
            raise
        except Exception as error:  # the Jobs API raises plain RuntimeError, requests' errors, ...
            raise ExecutorUnavailableError(self._explain(error)) from error
        logger.info("job %s submitted to the Ray cluster at %s", submission_id, self.address)
        return RayJobHandle(self.client, submission_id, launch.out_dir)

    def _adopt_or_clear(self, submission_id: str, out_dir: Path) -> RayJobHandle | None:
        """A Ray job of this id still running (its worker died, the cluster kept it) is watched
        again instead of started twice; a finished one is deleted so that the id can be reused."""
        try:
            status = self.client.get_job_status(submission_id)
        except RuntimeError as error:
            if "does not exist" in str(error):
                return None
            raise
        if not status.is_terminal():
            logger.warning("job %s still runs on the Ray cluster; watching it again", submission_id)
            return RayJobHandle(self.client, submission_id, out_dir)
        self.client.delete_job(submission_id)
        return None

    def submission(self, launch: Launch) -> dict[str, Any]:
        """The arguments of `JobSubmissionClient.submit_job` for one attempt of a job."""
        gpus = 0.0 if launch.devices == ["cpu"] else self.gpus_per_process
        env_vars = {"GMNM_JOB_ID": launch.job_id, **launch.env}
        distributed = launch.kind == "fine_tune" and (
            launch.num_processes > 1 or launch.num_nodes > 1
        )
        if distributed:
            command = [
                *RAY_TRAIN_PROGRAM,
                "--num-workers",
                str(launch.num_processes),
                "--num-nodes",
                str(launch.num_nodes),
                "--gpus-per-worker",
                f"{gpus:g}",
                *launch.arguments,
            ]
            # The driver only waits for Ray Train's workers, which hold the job's resources.
            resources: dict[str, Any] = {"entrypoint_num_cpus": 0}
        else:
            command = launch.command
            resources = {"entrypoint_num_cpus": 1}
            if gpus:
                resources["entrypoint_num_gpus"] = gpus
        return {
            "entrypoint": shlex.join(command),
            "submission_id": launch.job_id,
            "runtime_env": {"env_vars": env_vars},
            "metadata": {"gmnm_job_id": launch.job_id, "gmnm_kind": launch.kind},
            **resources,
        }

    def _explain(self, error: BaseException) -> str:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "Authentication" in type(error).__name__ or "401" in text or "403" in text:
            return (
                f"the Ray cluster at {self.address} refused the service's token ({text}); set "
                "GMNM_RAY_AUTH_TOKEN (or GMNM_RAY_AUTH_TOKEN_FILE) to the cluster's token"
            )
        return f"the Ray cluster at {self.address} did not take the job: {text}"

    def stop_lost(self, job_id: str) -> None:
        try:
            self.client.stop_job(job_id)
        except Exception as error:  # a job Ray never saw, or a cluster that is gone
            logger.info("no Ray job %s to stop: %s", job_id, error)
