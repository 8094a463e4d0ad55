"""A data-parallel fine-tune on a Ray cluster: the Ray job's entry point when a fine-tune asks for
`num_processes > 1` or `num_nodes > 1` under GMNM_EXECUTOR=ray.

    python -m service.ray_train --num-workers N [--num-nodes M] [--gpus-per-worker G]
        --spec spec.json --out DIR [--resume]

Ray Train's `TorchTrainer` starts N workers wherever the cluster has their resources, joins them
in a torch process group (gloo on CPU, NCCL on GPU) and sets RANK, WORLD_SIZE and LOCAL_RANK;
each worker then runs the engine's own fine-tune (`training.finetune.run_fine_tune`) as a
torchrun rank would, so the job's events, checkpoints and metrics are the same as on one host.
Rank 0 writes them to DIR, which every node must see at the same path (the service's shared data
directory).

Stopping: SIGTERM (what Ray's `stop_job` sends) creates the CANCEL file in DIR; every rank stops
after the same step, rank 0 writes a checkpoint, and the driver exits with EXIT_CANCELLED. Exit
statuses and error.json follow `training.protocol`, as for `gmnm-train`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from training.checkpoint import write_json_atomic
from training.cli import classify
from training.errors import SpecError
from training.protocol import (
    CANCEL_FILE,
    ERROR_FILE,
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
)
from training.spec import FineTuneSpec, load_spec

logger = logging.getLogger(__name__)

_INVALID_CODES = ("invalid_spec", "invalid_data")
# The key rank 0 reports its job status under, read back by the driver.
_STATUS_KEY = "gmnm_status"


def placement_strategy(num_workers: int, num_nodes: int) -> str:
    """How Ray places the workers: together when one node is asked for, one per node when there
    are as many nodes as workers, else spread as evenly as the cluster allows."""
    if num_nodes <= 1:
        return "PACK"
    return "STRICT_SPREAD" if num_nodes == num_workers else "SPREAD"


def train_loop(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: the engine's fine-tune as one rank of the job."""
    import ray.train

    from training.finetune import run_fine_tune
    from training.runtime import CancelToken

    context = ray.train.get_context()
    rank = context.get_world_rank()
    # The engine checks its per-host process count against the GPUs it sees.
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(context.get_local_world_size()))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    out_dir = Path(config["out"])
    spec = load_spec(FineTuneSpec, config["spec"])
    try:
        result = run_fine_tune(spec, out_dir, resume=config["resume"], cancel=CancelToken(out_dir))
    except BaseException as error:
        if rank == 0:
            code, message = classify(error)
            logger.error("job failed (%s): %s", code, message)
            write_json_atomic(out_dir / ERROR_FILE, {"code": code, "message": message})
        raise
    ray.train.report({_STATUS_KEY: result.status, "step": result.step})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.ray_train",
        description="Run one data-parallel GMNM fine-tune with Ray Train on the current cluster.",
    )
    parser.add_argument("--num-workers", type=int, required=True, help="processes in all")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes to spread them over")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--spec", required=True, help="the job's JSON spec")
    parser.add_argument("--out", required=True, help="the job's output directory (shared)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    return parser


def _write_error(out_dir: Path, code: str, message: str) -> None:
    if not (out_dir / ERROR_FILE).exists():  # a rank's own account of the failure comes first
        write_json_atomic(out_dir / ERROR_FILE, {"code": code, "message": message})


def _error_code(out_dir: Path) -> str | None:
    try:
        error = json.loads((out_dir / ERROR_FILE).read_text())
    except (OSError, ValueError):
        return None
    return error.get("code") if isinstance(error, dict) else None


def run(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ERROR_FILE).unlink(missing_ok=True)

    # refuse a bad spec before any worker starts
    try:
        spec = load_spec(FineTuneSpec, args.spec)
    except SpecError as error:
        _write_error(out_dir, error.code, error.message)
        return EXIT_INVALID
    if spec.hyperparameters.num_processes != args.num_workers:
        message = (
            f"hyperparameters.num_processes is {spec.hyperparameters.num_processes} but "
            f"{args.num_workers} Ray Train workers were asked for; they must match"
        )
        _write_error(out_dir, "invalid_spec", message)
        return EXIT_INVALID

    # a stop request reaches every rank through the CANCEL file, between two steps
    def stop(signum: int, frame: FrameType | None) -> None:
        logger.warning("received %s: asking every rank to stop", signal.Signals(signum).name)
        (out_dir / CANCEL_FILE).touch()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    # start the workers and wait for them
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    gpus = args.gpus_per_worker
    resources = {"CPU": 1.0, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": args.spec, "out": str(out_dir), "resume": args.resume},
        scaling_config=ScalingConfig(
            num_workers=args.num_workers,
            use_gpu=bool(gpus),
            resources_per_worker=resources,
            placement_strategy=placement_strategy(args.num_workers, args.num_nodes),
        ),
        run_config=RunConfig(
            name=out_dir.name,
            storage_path=str(out_dir / "ray_train"),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as error:  # Ray Train wraps whatever a worker raised
        logger.error("the Ray Train workers failed: %s", error)
        _write_error(out_dir, *classify(error))
        return EXIT_INVALID if _error_code(out_dir) in _INVALID_CODES else EXIT_FAILED
    status = (result.metrics or {}).get(_STATUS_KEY)
    return EXIT_CANCELLED if status == "cancelled" else EXIT_OK


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
