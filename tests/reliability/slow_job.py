"""A job program whose checkpoints take seconds to write, through the training engine's own writer.

    python slow_job.py --spec spec.json --out DIR [--resume] --kind fine_tune [knobs]

It counts steps like the service tests' fake job, but writes each checkpoint with
`training.checkpoint.write_checkpoint` (temporary directory, fsync, rename) and a model file
written in slow pieces, so that a test can kill everything while a checkpoint is half written.
The model file's bytes are a function of the step (`expected_model_bytes`), so a test can tell
a complete checkpoint from a truncated one.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from training import protocol
from training.checkpoint import list_checkpoints, remove_partial, write_checkpoint

MODEL_FILE = "model.safetensors"
PIECES = 8
PIECE_BYTES = 64 * 1024

stop_requested = False


def expected_model_bytes(step: int) -> bytes:
    return b"".join(bytes([(step * 31 + piece) % 256]) * PIECE_BYTES for piece in range(PIECES))


def event(out: Path, **fields: object) -> None:
    fields.setdefault("time", time.time())
    fields.setdefault("step", None)
    fields.setdefault("message", "")
    with (out / protocol.EVENTS_FILE).open("a") as handle:
        handle.write(json.dumps(fields) + "\n")


def slow_model_writer(step: int, seconds: float):  # type: ignore[no-untyped-def]
    content = expected_model_bytes(step)

    def save(directory: Path) -> None:
        with (directory / MODEL_FILE).open("wb") as handle:
            for piece in range(PIECES):
                handle.write(content[piece * PIECE_BYTES : (piece + 1) * PIECE_BYTES])
                handle.flush()
                time.sleep(seconds / PIECES)
        (directory / "config.json").write_text(json.dumps({"step": step}))

    return save


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kind", default="fine_tune")
    parser.add_argument("--step-seconds", type=float, default=0.05)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--write-seconds", type=float, default=2.0)
    args = parser.parse_args()
    out = Path(args.out)
    spec = json.loads(Path(args.spec).read_text())

    def on_sigterm(signum: int, frame: object) -> None:
        global stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_sigterm)
    total = int((spec.get("hyperparameters") or {}).get("max_steps") or 9)
    start = 0
    if args.resume:
        remove_partial(out)
        complete = list_checkpoints(out)
        start = complete[-1].step if complete else 0
    event(out, type="message", message=f"training from step {start} to {total}")
    for step in range(start + 1, total + 1):
        time.sleep(args.step_seconds)
        values = {"train_loss": 1.0 / step}
        event(out, type="metrics", step=step, total_steps=total, epoch=step / total, values=values)
        if step % args.checkpoint_every == 0 or step == total or stop_requested:
            info = {"metrics": {"train_loss": 1.0 / step}}
            write_checkpoint(out, step, slow_model_writer(step, args.write_seconds), info)
            event(out, type="message", message=f"checkpoint step-{step} written", step=step)
        if stop_requested:
            return protocol.EXIT_CANCELLED
    (out / protocol.METRICS_FILE).write_text(json.dumps({"train_loss": 1.0 / total}))
    return protocol.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
