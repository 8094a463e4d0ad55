"""A job program that follows training.protocol without training anything, for supervisor tests.

    python fake_job.py --spec spec.json --out DIR [--resume] [knobs]

It counts steps (sleeping between them), writes an event per step, a checkpoint every few steps
and at the end, stops with a checkpoint on SIGTERM or a CANCEL file, and resumes from its newest
checkpoint. Knobs make it fail (at once, or at a step of its first attempt), wait before it
starts (as loading a model does; a stop request ends the wait), ignore SIGTERM, or start a child
process in its group.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# Load the protocol module alone: importing the training package would pull in torch, and these
# tests start many short job processes.
_PROTOCOL = Path(__file__).resolve().parents[2] / "training" / "protocol.py"
_spec = importlib.util.spec_from_file_location("protocol", _PROTOCOL)
assert _spec is not None and _spec.loader is not None
protocol = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(protocol)

# smallest valid PNG: 1x1 grey pixel
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010800000000"
    "3a7e9b550000000a49444154789c63600000000200015e2f6f3f0000000049454e44ae426082"
)

stop_requested = False


def on_sigterm(signum, frame):
    global stop_requested
    stop_requested = True


def event(out: Path, **fields) -> None:
    fields.setdefault("time", time.time())
    fields.setdefault("step", None)
    fields.setdefault("message", "")
    with (out / protocol.EVENTS_FILE).open("a") as handle:
        handle.write(json.dumps(fields) + "\n")
        handle.flush()


def checkpoint(out: Path, step: int, loss: float) -> None:
    final = out / protocol.CHECKPOINTS_DIR / f"{protocol.CHECKPOINT_PREFIX}{step}"
    if final.exists():
        return
    temporary = final.with_name(f".tmp-{final.name}")
    temporary.mkdir(parents=True, exist_ok=True)
    (temporary / "model.safetensors").write_bytes(f"weights at step {step}".encode() * 100)
    (temporary / "manifest.json").write_text(json.dumps({"step": step}))
    (temporary / "training_state.pt").write_bytes(b"optimizer state" * 50)
    info = {"step": step, "metrics": {"loss": loss}, "created_at": time.time()}
    (temporary / protocol.CHECKPOINT_INFO_FILE).write_text(json.dumps(info))
    temporary.rename(final)


def latest_step(out: Path) -> int:
    directory = out / protocol.CHECKPOINTS_DIR
    steps = (
        [
            int(path.name.removeprefix(protocol.CHECKPOINT_PREFIX))
            for path in directory.glob(f"{protocol.CHECKPOINT_PREFIX}*")
        ]
        if directory.is_dir()
        else []
    )
    return max(steps, default=0)


def fail(out: Path, code: str) -> int:
    error = {"code": code, "message": f"the fake job failed with {code}"}
    (out / protocol.ERROR_FILE).write_text(json.dumps(error))
    event(out, type="message", message="failing on purpose", level="error")
    return protocol.EXIT_FAILED


def stop_asked(out: Path, args: argparse.Namespace) -> bool:
    cancel_file = (out / protocol.CANCEL_FILE).exists() and not args.ignore_sigterm
    return stop_requested or cancel_file


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kind", choices=("fine_tune", "conversion", "evaluation"), required=True)
    parser.add_argument("--step-seconds", type=float, default=0.01)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--fail-with", default=None)
    parser.add_argument(
        "--fail-at-step", type=int, default=None, help="fail on reaching it, unless resuming"
    )
    parser.add_argument("--start-seconds", type=float, default=0.0, help="before any work")
    parser.add_argument("--ignore-sigterm", action="store_true", help="and the CANCEL file")
    parser.add_argument("--spawn-child", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    spec = json.loads(Path(args.spec).read_text())
    (out / "attempts.log").open("a").write(f"{os.getpid()} resume={args.resume}\n")

    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.ignore_sigterm else on_sigterm)
    if args.spawn_child:
        child = subprocess.Popen(["sleep", "300"])
        (out / "child.pid").write_text(str(child.pid))

    if args.fail_with:
        return fail(out, args.fail_with)

    started = time.monotonic()
    while time.monotonic() - started < args.start_seconds:
        time.sleep(0.02)
        if stop_asked(out, args):
            event(out, type="message", message="stopped before starting")
            return protocol.EXIT_CANCELLED

    if args.kind == "conversion":
        plan = {"sites": [{"path": "mlp.act", "kind": "activation"}]}
        report = {"sites_replaced": 1, "max_abs_difference": 0.0}
        if not spec.get("dry_run"):
            checkpoint(out, 0, 0.0)
        (out / protocol.RESULT_FILE).write_text(json.dumps({"plan": plan, "report": report}))
        event(out, type="message", message="converted 1 site")
        return protocol.EXIT_OK
    if args.kind == "evaluation":
        result = {"model": {"accuracy": 0.5}, "compare_to": {"accuracy": 0.25}}
        (out / protocol.RESULT_FILE).write_text(json.dumps(result))
        (out / protocol.METRICS_FILE).write_text(json.dumps({"accuracy": 0.5}))
        return protocol.EXIT_OK

    total = int(spec["hyperparameters"].get("max_steps") or 6)
    start = latest_step(out) if args.resume else 0
    event(out, type="message", message=f"training from step {start} to {total}")
    loss = 1.0
    for step in range(start + 1, total + 1):
        if step == args.fail_at_step and not args.resume:
            return fail(out, "failed_at_step")
        time.sleep(args.step_seconds)
        loss = 1.0 / step
        values = {"loss": loss, "learning_rate": 0.001, "tokens": step * 32}
        event(out, type="metrics", step=step, total_steps=total, epoch=step / total, values=values)
        if step % args.checkpoint_every == 0 or step == total:
            checkpoint(out, step, loss)
        if stop_asked(out, args):
            checkpoint(out, step, loss)
            event(out, type="message", message=f"stopped at step {step}")
            return protocol.EXIT_CANCELLED
    (out / protocol.METRICS_FILE).write_text(json.dumps({"loss": loss, "accuracy": 0.9}))
    (out / protocol.CURVES_FILE).write_bytes(PNG)
    return protocol.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
