"""Executors start a job's program and control it; the supervisor only talks to this interface.

`LocalExecutor` runs each job as a child process in its own session (so its process group can be
signalled as a whole and outlives nothing it should not). Other back ends (torchrun on several
GPUs, Ray Jobs on a cluster) implement the same two classes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)


@dataclass
class Launch:
    """What to run for one attempt of a job."""

    job_id: str
    command: list[str]
    out_dir: Path
    device: str
    env: dict[str, str] = field(default_factory=dict)


class JobHandle(Protocol):
    pid: int

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


def device_environment(device: str) -> dict[str, str]:
    """Restrict a job to its device: `cuda:N` becomes CUDA_VISIBLE_DEVICES=N, `cpu` hides GPUs."""
    if device.startswith("cuda:"):
        return {"CUDA_VISIBLE_DEVICES": device.split(":", 1)[1], "GMNM_DEVICE": "cuda"}
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": "", "GMNM_DEVICE": "cpu"}
    return {"GMNM_DEVICE": device}


class LocalProcess:
    """One job process and its process group."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process
        self.pid = process.pid

    def poll(self) -> int | None:
        return self._process.poll()

    def terminate(self) -> None:
        signal_group(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        signal_group(self.pid, signal.SIGKILL)


class LocalExecutor:
    """Runs jobs as processes on this host, at a lower CPU priority than the API (`niceness`),
    so that a job using every core does not slow down the requests that poll it."""

    def __init__(self, niceness: int = 0) -> None:
        self.niceness = niceness

    def launch(self, launch: Launch) -> LocalProcess:
        launch.out_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **device_environment(launch.device), **launch.env}
        with (launch.out_dir / "job.log").open("ab") as log:
            process = subprocess.Popen(
                launch.command,
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
        logger.info("job %s started as pid %d on %s", launch.job_id, process.pid, launch.device)
        return LocalProcess(process)


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


def make_executor(name: str, niceness: int = 0) -> Executor:
    if name == "local":
        return LocalExecutor(niceness)
    raise ValueError(f"unknown executor {name!r}; the available executors are: local")
