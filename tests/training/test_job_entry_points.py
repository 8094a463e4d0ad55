"""The entry points as the service runs them: exit statuses, error.json, signals, --resume."""

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from tests.training.helpers import events_of, read_json
from training.checkpoint import list_checkpoints
from training.cli import classify
from training.convert import run_conversion
from training.errors import DataError
from training.protocol import (
    CANCEL_FILE,
    ERROR_FILE,
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_INVALID,
    RESULT_FILE,
    SPEC_FILE,
)
from training.spec import ConvertSpec

ROOT = Path(__file__).resolve().parents[2]


def _command(command: str, spec: dict[str, Any] | str, out: Path, *extra: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out.parent / f"{out.name}-spec.json"
    spec_path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return [
        sys.executable,
        "-m",
        "training.cli",
        command,
        "--spec",
        str(spec_path),
        "--out",
        str(out),
        *extra,
    ]


def _job(command: str, spec: dict[str, Any] | str, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        _command(command, spec, out, *extra),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _on_a_terminal(command: list[str]) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal 100 columns wide; returns the status and all output."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(
        command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the job has exited and closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=120), b"".join(chunks).decode(errors="replace")


def _finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def _wait_for_step(out: Path, above: int, process: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [e["step"] for e in events_of(out) if e["type"] == "metrics" and e.get("step")]
        if steps and max(steps) > above:
            return max(steps)
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError(f"no training step above {above} within {timeout} s")


@pytest.mark.slow
def test_invalid_spec_exits_2_with_every_problem_in_error_json(tmp_path: Path) -> None:
    bad = {
        "model": "m",
        "data": {"train": {"builtin": "digits"}},
        "device": "tpu",
        "hyperparameters": {"batch_size": 0},
    }
    status, stderr = _finish(_job("train", bad, tmp_path / "job"))
    assert status == EXIT_INVALID
    error = read_json(tmp_path / "job" / ERROR_FILE)
    assert error["code"] == "invalid_spec"
    assert "device: must be auto, cpu, cuda or cuda:N" in error["message"]
    assert "hyperparameters.batch_size" in error["message"]
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_bad_data_exits_2_naming_the_line(tmp_path: Path, tiny_bert: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "good", "label": "pos"}\n{"text": "bad" "label": "neg"}\n')
    spec = {"model": str(tiny_bert), "device": "cpu", "data": {"train": {"path": str(data)}}}
    status, _ = _finish(_job("train", spec, tmp_path / "job"))
    assert status == EXIT_INVALID
    error = read_json(tmp_path / "job" / ERROR_FILE)
    assert error["code"] == "invalid_data"
    assert error["message"].startswith("train.jsonl line 2: not valid JSON")
    assert read_json(tmp_path / "job" / SPEC_FILE)["model"] == str(tiny_bert)


@pytest.mark.slow
def test_epochs_past_the_step_limit_exit_2_before_training(
    tmp_path: Path, tiny_bert: Path, reviews: tuple[Path, Path]
) -> None:
    train, _ = reviews
    spec = {
        "model": str(tiny_bert),
        "device": "cpu",
        "data": {"train": {"path": str(train)}, "max_length": 16},
        "hyperparameters": {"batch_size": 4, "epochs": 50},
        "limits": {"max_steps": 20},
    }
    status, stderr = _finish(_job("train", spec, tmp_path / "job"))
    assert status == EXIT_INVALID, stderr[-3000:]
    error = read_json(tmp_path / "job" / ERROR_FILE)
    assert error["code"] == "invalid_spec"
    assert error["message"].startswith("hyperparameters.epochs: 50 epochs of ")
    assert "above this job's limit of 20 (limits.max_steps)" in error["message"]
    assert not list_checkpoints(tmp_path / "job")


@pytest.mark.slow
@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bar_on_a_terminal_and_plain_log_lines_otherwise(
    tmp_path: Path, tiny_bert: Path, reviews: tuple[Path, Path], terminal: bool
) -> None:
    train, _ = reviews
    spec = {
        "model": str(tiny_bert),
        "device": "cpu",
        "data": {"train": {"path": str(train)}, "max_length": 16},
        "hyperparameters": {"batch_size": 8, "max_steps": 4, "log_interval": 1},
    }
    command = _command("train", spec, tmp_path / "job")
    if terminal:
        status, output = _on_a_terminal(command)
    else:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        status, output = done.returncode, done.stderr
    assert status == 0, output[-3000:]
    assert "INFO training.events: step 4/4 loss " in output
    bar = re.compile(r"4/4 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+step/s, loss=\d\.\d{4}\]")
    if terminal:
        assert bar.search(output), output[-3000:]
    else:  # neither the job's bar nor the libraries' (loading weights, writing shards)
        assert "\r" not in output and not re.search(r"\d+/\d+ \[", output), output[-3000:]


@pytest.mark.slow
def test_unknown_model_exits_1_with_model_not_found(tmp_path: Path) -> None:
    spec = {
        "model": "nobody/no-such-model",
        "device": "cpu",
        "task": "image-classification",
        "data": {"train": {"builtin": "digits"}},
    }
    status, _ = _finish(_job("eval", spec, tmp_path / "job"))
    assert status == EXIT_FAILED
    assert read_json(tmp_path / "job" / ERROR_FILE)["code"] == "model_not_found"


@pytest.mark.slow
def test_sigterm_then_resume_then_cancel_file(
    tmp_path: Path, tiny_bert: Path, reviews: tuple[Path, Path]
) -> None:
    train, valid = reviews
    spec = {
        "model": str(tiny_bert),
        "device": "cpu",
        "data": {
            "train": {"path": str(train)},
            "validation": {"path": str(valid)},
            "max_length": 16,
        },
        "hyperparameters": {"batch_size": 4, "max_steps": 100000, "log_interval": 1},
    }
    out = tmp_path / "job"

    # SIGTERM stops the job between steps with a checkpoint and the cancelled status
    job = _job("train", spec, out)
    _wait_for_step(out, 1, job)
    job.send_signal(signal.SIGTERM)
    status, stderr = _finish(job)
    assert status == EXIT_CANCELLED, stderr[-3000:]
    [first] = list_checkpoints(out)
    assert not (out / ERROR_FILE).exists()

    # --resume continues after it, ignoring the CANCEL file a previous cancel left
    (out / CANCEL_FILE).touch()
    job = _job("train", spec, out, "--resume")
    _wait_for_step(out, first.step, job)
    (out / CANCEL_FILE).touch()
    status, stderr = _finish(job)
    assert status == EXIT_CANCELLED, stderr[-3000:]
    second = list_checkpoints(out)[-1]
    assert second.step > first.step
    assert any("from checkpoint step" in e["message"] for e in events_of(out))


def test_conversion_dry_run_writes_only_the_plan(tmp_path: Path) -> None:
    spec = ConvertSpec.model_validate(
        {
            "model": "test_vit",
            "pretrained": False,
            "dry_run": True,
            "conversion": {"targets": ["softmax"]},
        }
    )
    run_conversion(spec, tmp_path)
    result = read_json(tmp_path / RESULT_FILE)
    assert result["dry_run"] is True and "report" not in result
    kinds = {site["kind"] for site in result["plan"]["sites"] if site["replace"]}
    assert kinds == {"softmax"}
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (DataError("x.jsonl line 3: bad"), "invalid_data"),
        (OSError(28, "No space left on device"), "disk_full"),
        (MemoryError(), "out_of_memory"),
        (ValueError("surprise"), "internal_error"),
    ],
)
def test_failures_map_to_protocol_error_codes(error: BaseException, code: str) -> None:
    assert classify(error)[0] == code


def test_surgery_errors_map_to_protocol_error_codes() -> None:
    from surgery.errors import RemoteCodeRefusedError, UnknownModelError, UnsupportedModelError

    assert classify(UnknownModelError("no"))[0] == "model_not_found"
    assert classify(RemoteCodeRefusedError("no"))[0] == "remote_code_refused"
    assert classify(UnsupportedModelError("no"))[0] == "unsupported_model"


def test_console_scripts_are_installed() -> None:
    bin_dir = Path(sys.executable).parent
    for name in ("gmnm-train", "gmnm-eval", "gmnm-convert"):
        assert os.access(bin_dir / name, os.X_OK), name
