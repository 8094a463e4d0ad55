"""Executors start a job's program and control it; the supervisor only talks to this interface.

`LocalExecutor` runs each job as a child process in its own session, so that its process group
can be signalled as a whole. A job holding several devices runs under `torchrun
--nproc-per-node N`; torchrun starts every rank in a session of its own, so its handle signals
torchrun's group and each rank's group. `service.executors_ray.RayExecutor` submits jobs to a Ray
cluster instead, behind the same two classes.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from training import protocol

if TYPE_CHECKING:
    from service.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class Launch:
    """What to run for one attempt of a job.

    `program` is the job kind's command (GMNM_JOB_COMMANDS) and `arguments` what follows it
    (`--spec`, `--out`, `--resume`). `devices` are the device slots the job holds, one per
    process on a local host.
    """

    job_id: str
    kind: str
    program: list[str]
    arguments: list[str]
    out_dir: Path
    devices: list[str]
    num_processes: int = 1
    num_nodes: int = 1
    env: dict[str, str] = field(default_factory=dict)

    @property
    def command(self) -> list[str]:
        return [*self.program, *self.arguments]


class ExecutorUnavailableError(RuntimeError):
    """The executor cannot take a job now (its cluster did not answer); the job stays queued."""


class JobHandle(Protocol):
    # The job's process id on this host; 0 when it runs elsewhere (a Ray cluster).
    pid: int
    # Launched but not started yet: a cluster still looking for the resources it asks for.
    waiting: bool

    def poll(self) -> int | None:
        """The exit status once the job has ended (negative: killed by that signal), else None."""
        ...

    def terminate(self) -> None:
        """Ask the job to stop: it writes a checkpoint and exits."""
        ...

    def kill(self) -> None:
        """Stop the job and everything it started, now."""
        ...


class Executor(Protocol):
    def launch(self, launch: Launch) -> JobHandle: ...

    def stop_lost(self, job_id: str) -> None:
        """Stop what may still run of a job whose worker is gone and that will not be resumed
        (a cancelled one, or one out of attempts). Processes on this host are the supervisor's
        business; this is for jobs that run elsewhere."""
        ...


# The server's credentials: its API keys, the database URL (which may hold a password) and the
# Ray cluster's token. No job program reads them (a job talks to none of the API, the database
# or Ray), so jobs do not inherit them and nothing a job runs can act as the server. Settings
# are read whatever the case of their names, hence the match in upper case.
SERVER_SECRETS = frozenset(
    {
        "GMNM_API_KEYS",
        "GMNM_API_KEYS_FILE",
        "GMNM_DATABASE_URL",
        "GMNM_RAY_AUTH_TOKEN",
        "GMNM_RAY_AUTH_TOKEN_FILE",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "PGPASSWORD",
    }
)


def job_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """The server's environment without its credentials (SERVER_SECRETS), for a job process."""
    return {
        name: value for name, value in environment.items() if name.upper() not in SERVER_SECRETS
    }


def device_environment(devices: str | list[str]) -> dict[str, str]:
    """Restrict a job to its devices: `cuda:N` slots become CUDA_VISIBLE_DEVICES=N[,M...], `cpu`
    slots hide every GPU."""
    names = [devices] if isinstance(devices, str) else list(devices)
    if names and all(name.startswith("cuda:") for name in names):
        indices = ",".join(name.split(":", 1)[1] for name in names)
        return {"CUDA_VISIBLE_DEVICES": indices, "GMNM_DEVICE": "cuda"}
    if names and all(name == "cpu" for name in names):
        return {"CUDA_VISIBLE_DEVICES": "", "GMNM_DEVICE": "cpu"}
    return {"GMNM_DEVICE": names[0] if names else "cpu"}


def describe_devices(devices: list[str]) -> str:
    """A short name for a set of device slots, as the API shows it: `cpu`, `cpu*2`,
    `cuda:0`, `cuda:0,1`."""
    if len(devices) == 1:
        return devices[0]
    if all(name == "cpu" for name in devices):
        return f"cpu*{len(devices)}"
    if all(name.startswith("cuda:") for name in devices):
        text = "cuda:" + ",".join(name.split(":", 1)[1] for name in devices)
    else:
        text = ",".join(devices)
    # The jobs table keeps 32 characters of it.
    return text if len(text) <= 32 else f"{len(devices)} devices"


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


def torchrun_command(command: list[str], num_processes: int) -> list[str]:
    """`command` as every rank of a single-host torchrun (c10d rendezvous on a free port)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(num_processes),
        "--max-restarts",
        "0",
        "--no-python",
        *command,
    ]


class LocalProcess:
    """One job process and its process group."""

    waiting = False  # a local process starts at once

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process
        self.pid = process.pid

    def poll(self) -> int | None:
        return self._process.poll()

    def terminate(self) -> None:
        signal_group(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        signal_group(self.pid, signal.SIGKILL)


class TorchrunProcess(LocalProcess):
    """torchrun and its ranks. Each rank leads a session of its own, so signals go to torchrun's
    group and to every rank's group (a rank's data loader workers are in the rank's group)."""

    def __init__(
        self, process: subprocess.Popen[bytes], job_id: str, out_dir: Path, num_processes: int
    ) -> None:
        super().__init__(process)
        self.job_id = job_id
        self.out_dir = out_dir
        self.num_processes = num_processes
        self.ranks: set[int] = set()
        self._stop_requested = False

    def _refresh_ranks(self) -> None:
        # Ranks are torchrun's direct children; remember them so that they can still be found
        # once torchrun itself has gone. torchrun never restarts them (--max-restarts 0).
        if len(self.ranks) < self.num_processes and self._process.poll() is None:
            self.ranks |= set(children_of(self.pid))

    def poll(self) -> int | None:
        self._refresh_ranks()
        status = self._process.poll()
        if status is None or status <= 0:
            return status
        # torchrun exits 1 whenever a rank exits non-zero, so the rank's own status is lost:
        # tell a failure (error.json written), a stop on request, and anything else apart.
        if (self.out_dir / protocol.ERROR_FILE).exists():
            return protocol.EXIT_FAILED
        if self._stop_requested:
            return protocol.EXIT_CANCELLED
        return status

    def terminate(self) -> None:
        self._stop_requested = True
        self._signal_all(signal.SIGTERM)

    def kill(self) -> None:
        self._signal_all(signal.SIGKILL)

    def _signal_all(self, signum: int) -> None:
        self._refresh_ranks()
        signal_group(self.pid, signum)
        for rank in sorted(self.ranks):
            if process_belongs_to(rank, self.job_id):
                signal_group(rank, signum)


class LocalExecutor:
    """Runs jobs as processes on this host, at a lower CPU priority than the API (`niceness`),
    so that a job using every core does not slow down the requests that poll it."""

    def __init__(self, niceness: int = 0) -> None:
        self.niceness = niceness

    def launch(self, launch: Launch) -> LocalProcess:
        launch.out_dir.mkdir(parents=True, exist_ok=True)
        command = resolve_command(launch.program) + launch.arguments
        env = {**job_environment(os.environ), **device_environment(launch.devices), **launch.env}
        if launch.num_processes > 1:
            command = torchrun_command(command, launch.num_processes)
            # torchrun would pin every rank to one thread; share this host's cores instead.
            cores = max(1, (os.cpu_count() or 1) // launch.num_processes)
            env.setdefault("OMP_NUM_THREADS", str(cores))
        with (launch.out_dir / "job.log").open("ab") as log:
            process = subprocess.Popen(
                command,
                cwd=launch.out_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if self.niceness:
            # Set on the new process group right away: it applies to the job before it starts
            # any worker processes, and they inherit it.
            try:
                mine = os.getpriority(os.PRIO_PROCESS, 0)
                os.setpriority(os.PRIO_PGRP, process.pid, min(19, mine + self.niceness))
            except OSError as error:
                logger.warning("could not lower the priority of job %s: %s", launch.job_id, error)
        logger.info(
            "job %s started as pid %d on %s%s",
            launch.job_id,
            process.pid,
            describe_devices(launch.devices),
            f" ({launch.num_processes} processes under torchrun)"
            if launch.num_processes > 1
            else "",
        )
        if launch.num_processes > 1:
            return TorchrunProcess(process, launch.job_id, launch.out_dir, launch.num_processes)
        return LocalProcess(process)

    def stop_lost(self, job_id: str) -> None:
        """Nothing to do: a lost job's processes on this host are killed by the supervisor."""


def signal_group(pgid: int, signum: int) -> bool:
    """Signal a whole process group; False when it no longer exists."""
    try:
        os.killpg(pgid, signum)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        logger.warning("not allowed to signal process group %d", pgid)
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def process_belongs_to(pid: int, job_id: str) -> bool:
    """Whether process `pid` on this host was started for `job_id` (guards against pid reuse)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"GMNM_JOB_ID={job_id}".encode() in environ.split(b"\0")


def children_of(pid: int) -> list[int]:
    """The direct children of `pid` on this host (empty where /proc cannot tell)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in parentheses may hold spaces; the parent pid follows the state.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def job_processes(job_id: str) -> list[int]:
    """Every process on this host started for `job_id`, whatever session it leads."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and process_belongs_to(int(entry.name), job_id):
            found.append(int(entry.name))
    return found


def make_executor(settings: Settings) -> Executor:
    if settings.executor == "local":
        return LocalExecutor(settings.job_niceness)
    if settings.executor == "ray":
        from service.executors_ray import RayExecutor

        return RayExecutor.from_settings(settings)
    raise ValueError(
        f"unknown executor {settings.executor!r}; the available executors are: local, ray"
    )
