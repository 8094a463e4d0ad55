"""Entry points: `gmnm-train`, `gmnm-eval` and `gmnm-convert` (`--spec spec.json --out DIR`).

Each runs one job and ends with a status from `training.protocol`: EXIT_OK, EXIT_FAILED (with
`error.json` saying why, as one of the protocol's error codes), EXIT_INVALID (the spec or the data
was refused before any work), or EXIT_CANCELLED (SIGTERM, SIGINT or a CANCEL file; a fine-tune
writes a checkpoint first). `gmnm-train` also runs under `torchrun --nproc-per-node N`; with
`num_processes > 1` in the spec and no torchrun it starts the N ranks itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from training.checkpoint import is_disk_full, write_json_atomic
from training.errors import SpecError, TrainingError
from training.protocol import (
    CANCEL_FILE,
    ERROR_FILE,
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    SPEC_FILE,
)
from training.spec import ConvertSpec, EvaluateSpec, FineTuneSpec, load_spec

logger = logging.getLogger(__name__)

COMMANDS: dict[str, type[Any]] = {
    "train": FineTuneSpec,
    "eval": EvaluateSpec,
    "convert": ConvertSpec,
}
_INVALID_CODES = ("invalid_spec", "invalid_data")


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"gmnm-{command}", description=f"Run one GMNM {command} job described by a spec."
    )
    parser.add_argument("--spec", required=True, help="the job's JSON spec")
    parser.add_argument("--out", required=True, help="the job's output directory")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint"
    )
    return parser


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _configure_logging() -> None:
    rank = _rank()
    prefix = f"[rank {rank}] " if "WORLD_SIZE" in os.environ else ""
    handler: logging.Handler = logging.StreamHandler()
    if rank == 0 and sys.stderr.isatty():
        handler = _TqdmHandler()
    else:
        # transformers and huggingface_hub draw their own bars (loading weights, writing shards)
        # even into a log file; their flag is read when they are imported, which is later
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


class _TqdmHandler(logging.Handler):
    """Log lines printed above a progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def classify(error: BaseException) -> tuple[str, str]:
    """The protocol error code and a message a user can act on, for any exception."""
    import torch

    import surgery

    errors = getattr(surgery, "errors", None)
    if isinstance(error, TrainingError):
        return error.code, error.message
    if errors is not None:
        if isinstance(error, errors.UnknownModelError):
            return "model_not_found", str(error)
        if isinstance(error, errors.RemoteCodeRefusedError):
            return "remote_code_refused", str(error)
        if isinstance(error, errors.SurgeryError):
            return "unsupported_model", str(error)
    if isinstance(error, torch.cuda.OutOfMemoryError | MemoryError):
        return "out_of_memory", (
            f"the device ran out of memory ({error}); lower hyperparameters.batch_size and raise "
            "gradient_accumulation_steps to keep the same effective batch"
        )
    if is_disk_full(error):
        return "disk_full", f"no space left on the job's device: {error}; free space"
    return "internal_error", f"{type(error).__name__}: {error}"


def _write_error(out_dir: Path, code: str, message: str) -> None:
    if _rank() != 0:
        return
    try:
        write_json_atomic(out_dir / ERROR_FILE, {"code": code, "message": message})
    except OSError as error:  # a full disk can refuse even this small file
        logger.error("could not write %s: %s", ERROR_FILE, error)


def _install_signal_handlers(request_stop: Callable[[], None]) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        logger.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


def _keep_spec(spec_path: Path, out_dir: Path, spec: Any) -> None:
    target = out_dir / SPEC_FILE
    if _rank() == 0 and spec_path.resolve() != target.resolve():
        write_json_atomic(target, spec.model_dump(mode="json"))


def run(command: str, argv: Sequence[str] | None = None) -> int:
    """Run one job; returns its exit status."""
    args = _parser(command).parse_args(argv)
    _configure_logging()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if _rank() == 0:
        (out_dir / ERROR_FILE).unlink(missing_ok=True)  # from an earlier attempt of this job

    # validate the spec before anything else
    try:
        spec = load_spec(COMMANDS[command], args.spec)
        _keep_spec(Path(args.spec), out_dir, spec)
    except SpecError as error:
        logger.error("%s", error.message)
        _write_error(out_dir, error.code, error.message)
        return EXIT_INVALID

    # several processes asked for and none launched: start the ranks here
    from training import distributed

    if (
        command == "train"
        and spec.hyperparameters.num_processes > 1
        and not distributed.in_launched_worker()
    ):
        module_args = [command, "--spec", str(args.spec), "--out", str(out_dir)]
        status = distributed.launch_workers(
            module_args + (["--resume"] if args.resume else []),
            spec.hyperparameters.num_processes,
        )
        if (
            status not in (EXIT_OK, EXIT_CANCELLED, EXIT_INVALID)
            and not (out_dir / ERROR_FILE).exists()
        ):
            _write_error(out_dir, "internal_error", f"a worker process exited with status {status}")
        return status if status in (EXIT_OK, EXIT_CANCELLED, EXIT_INVALID) else EXIT_FAILED

    # a CANCEL file left by the run being resumed must not stop this one
    from training.runtime import CancelToken

    cancel = CancelToken(out_dir)
    if args.resume and _rank() == 0 and cancel.cancel_file.exists():
        logger.info("removing the %s file of the run being resumed", CANCEL_FILE)
        cancel.cancel_file.unlink(missing_ok=True)
    _install_signal_handlers(cancel.request)

    # run the job and turn whatever ended it into an exit status
    try:
        result = _runner(command)(spec, out_dir, resume=args.resume, cancel=cancel)
    except BaseException as error:
        code, message = classify(error)
        if code == "internal_error":
            logger.error("job failed:\n%s", "".join(traceback.format_exception(error)))
        else:
            logger.error("job failed (%s): %s", code, message)
        _write_error(out_dir, code, message)
        return EXIT_INVALID if code in _INVALID_CODES else EXIT_FAILED
    return EXIT_CANCELLED if result.status == "cancelled" else EXIT_OK


def _runner(command: str) -> Callable[..., Any]:
    if command == "train":
        from training.finetune import run_fine_tune

        return run_fine_tune
    if command == "eval":
        from training.evaluate import run_evaluation

        return run_evaluation
    from training.convert import run_conversion

    return run_conversion


def train_main() -> None:
    sys.exit(run("train"))


def eval_main() -> None:
    sys.exit(run("eval"))


def convert_main() -> None:
    sys.exit(run("convert"))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m training.cli {train,eval,convert} --spec ... --out ...`"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        sys.stderr.write(f"usage: python -m training.cli {{{','.join(COMMANDS)}}} --spec --out\n")
        return EXIT_INVALID
    return run(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
