"""Data-parallel plumbing: the process group, the device per rank, and a launcher.

A job runs in one process, under `torchrun --nproc-per-node N` (which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT), or under `launch_workers`, which starts the same N workers itself
when a spec asks for `num_processes > 1` and the command was not started by torchrun. Gloo on
CPU, NCCL on CUDA; rank 0 logs and writes, every rank computes.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

import torch
import torch.distributed as dist

from training.errors import SpecError

logger = logging.getLogger(__name__)

# Long enough for rank 0 to write a large checkpoint while the others wait at a barrier.
_COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
# How long the launcher lets the other workers finish after one of them has failed.
_FAILURE_GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def in_launched_worker() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _one_gpu_per_process(local_rank: int) -> torch.device:
    """NCCL needs a GPU of its own for every process on a host."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if processes > torch.cuda.device_count():
        raise SpecError(
            f"hyperparameters.num_processes: {processes} processes on this host need as many "
            f"GPUs, but {torch.cuda.device_count()} are visible; lower num_processes"
        )
    return torch.device("cuda", local_rank)


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "auto":
        if torch.cuda.is_available():
            return _one_gpu_per_process(local_rank)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SpecError(
            f"device: {requested!r} was requested but no CUDA device is visible to the job; "
            "use 'cpu' or 'auto'"
        )
    if requested == "cuda":
        return _one_gpu_per_process(local_rank)
    index = int(requested.split(":")[1])
    if index >= torch.cuda.device_count():
        raise SpecError(
            f"device: {requested!r} does not exist; this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device("cuda", index)


def setup(requested_device: str) -> DistContext:
    """Join the process group when launched as one of several workers."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=_COLLECTIVE_TIMEOUT)
        logger.info("rank %d of %d joined the %s process group", rank, world_size, backend)
    return DistContext(rank, world_size, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, ctx: DistContext, op: str = "sum") -> torch.Tensor:
    """Reduce in place across ranks (no-op in a single process); gloo needs CPU tensors for
    some ops, so values travel on the collective's own device."""
    if not ctx.enabled:
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    dist.all_reduce(tensor, op=reduce_op)
    return tensor


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def gather_objects(obj: object, ctx: DistContext) -> list[object]:
    if not ctx.enabled:
        return [obj]
    gathered: list[object] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: object, ctx: DistContext) -> object:
    if not ctx.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def launch_workers(module_args: list[str], num_processes: int) -> int:
    """Run `python -m training.cli <module_args>` as `num_processes` ranks on this host.

    SIGTERM and SIGINT are passed on to every worker (each then stops between steps and rank 0
    writes the checkpoint). Returns rank 0's exit status, or the first failure's when rank 0
    succeeded but another rank did not.
    """
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(num_processes),
        LOCAL_WORLD_SIZE=str(num_processes),
    )
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_processes))
    workers = []
    for rank in range(num_processes):
        worker_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        command = [sys.executable, "-m", "training.cli", *module_args]
        workers.append(subprocess.Popen(command, env=worker_env))
    logger.info("started %d worker processes", num_processes)

    def forward_signal(signum: int, frame: FrameType | None) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    previous = {s: signal.signal(s, forward_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _wait(workers)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _wait(workers: list[subprocess.Popen[bytes]]) -> int:
    failed_at: float | None = None
    while True:
        codes = [worker.poll() for worker in workers]
        if all(code is not None for code in codes):
            break
        if failed_at is None and any(code not in (None, 0) for code in codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > _FAILURE_GRACE_SECONDS:
            # The survivors are stuck in a collective waiting for the rank that failed.
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
        time.sleep(0.2)
    statuses = [worker.returncode for worker in workers]
    if statuses[0] != 0:
        return statuses[0]
    return next((code for code in statuses if code != 0), 0)
