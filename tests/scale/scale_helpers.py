"""What the scaling-out tests share: a tiny model and data for the real engine, the job programs,
a PostgreSQL schema of their own, worker processes, and a local Ray head on loopback."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
FAKE_JOB = ROOT / "tests" / "service" / "fake_job.py"
ENGINE = {"fine_tune": "train", "evaluation": "eval", "conversion": "convert"}

GOOD = ["good", "great", "fine", "lovely", "superb"]
BAD = ["bad", "awful", "poor", "dreadful", "ugly"]
FILLER = ["the", "a", "film", "was", "quite", "plot"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def build_tiny_bert(directory: Path) -> Path:
    """A 2-layer, 32-wide BERT classifier with a word-level tokenizer, from a config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = SPECIALS + sorted(set(GOOD + BAD + FILLER))
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def reviews(count: int = 64, seed: int = 0) -> bytes:
    """JSONL of short labelled reviews the tiny BERT's tokenizer knows every word of."""
    rng = random.Random(seed)
    lines = []
    for index in range(count):
        label = "pos" if index % 2 else "neg"
        words = [rng.choice(GOOD if label == "pos" else BAD), *rng.sample(FILLER, 3)]
        rng.shuffle(words)
        lines.append(json.dumps({"text": " ".join(words), "label": label}))
    return ("\n".join(lines) + "\n").encode()


def engine_commands(*fake_knobs: str, fake_kinds: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """The real entry points, with the kinds in `fake_kinds` run by the protocol-following fake
    job instead (a fast stand-in that occupies a device)."""
    beside = Path(sys.executable).parent
    commands = {}
    for kind, command in ENGINE.items():
        if kind in fake_kinds:
            commands[kind] = [sys.executable, str(FAKE_JOB), "--kind", kind, *fake_knobs]
        elif (beside / f"gmnm-{command}").exists():
            commands[kind] = [f"gmnm-{command}"]
        else:
            commands[kind] = [sys.executable, "-m", "training.cli", command]
    return commands


def fake_commands(*knobs: str) -> dict[str, list[str]]:
    return engine_commands(*knobs, fake_kinds=tuple(ENGINE))


def fine_tune_body(model: Path, file_id: str, **hyperparameters: Any) -> dict[str, Any]:
    return {
        "model": str(model),
        "training_file": file_id,
        "task": "text-classification",
        "data": {"max_length": 16},
        "conversion": {"gmnm": {"num_components": 4}},
        "hyperparameters": {"batch_size": 8, "log_interval": 1, **hyperparameters},
        "limits": {"max_eval_samples": 16},
        "seed": 1,
    }


def wait_for(
    fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float, what: str
) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fetch()
        if done(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout} s; last seen: {last}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def processes_with_env(name: str, value: str) -> list[int]:
    """Processes on this host whose environment holds NAME=VALUE."""
    wanted = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if wanted in environ.split(b"\0") and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


# worker processes


class WorkerProcess:
    """`gmnm worker` in a process of its own, as on another host."""

    def __init__(self, data_dir: Path, env: dict[str, str], name: str) -> None:
        self.name = name
        self.log = data_dir.parent / f"worker-{name}.log"
        command = [sys.executable, "-m", "service.cli", "worker", "--data-dir", str(data_dir)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**os.environ, **env, "GMNM_WORKER_HOSTNAME": f"host-{name}"},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# Ray


class RayHead:
    """A one-node Ray cluster on loopback: CPU only, a private temporary directory, a bounded
    object store, the dashboard (which serves the Jobs API) on 127.0.0.1, token authentication
    on. Every process it starts carries a marker in its environment, so that `stop()` can end
    exactly those, however they were started."""

    def __init__(self, cpus: int = 4) -> None:
        self.token = secrets.token_hex(16)
        self.marker = secrets.token_hex(8)
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # Ray puts Unix sockets under its temporary directory; their paths must stay short.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="gmnm-ray-", dir="/tmp"))
        self.log = self.temp_dir / "head.log"
        self.cpus = cpus
        self.process: subprocess.Popen[bytes] | None = None

    def environment(self) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        return {
            **os.environ,
            # Job entry points (gmnm-train, python) are looked up on the nodes' PATH.
            "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            # Ray otherwise announces the host's outward address even when told 127.0.0.1, and
            # its processes would talk over it; this keeps every address on loopback.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # Time for a stopped job to write its checkpoint before Ray sends SIGKILL.
            "RAY_JOB_STOP_WAIT_TIME_S": "60",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "OMP_NUM_THREADS": "1",
            "GMNM_TEST_RAY_MARKER": self.marker,
        }

    def start(self, timeout: float = 180.0) -> RayHead:
        ray = Path(sys.executable).parent / "ray"
        command = [
            str(ray),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--num-cpus={self.cpus}",
            "--num-gpus=0",
            f"--object-store-memory={100 * 1024 * 1024}",
            f"--temp-dir={self.temp_dir / 't'}",
            "--disable-usage-stats",
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"ray start exited: {self.log.read_text()[-3000:]}")
            try:
                self.client().list_jobs()
                return self
            except Exception:  # not answering yet: any error of the client means "wait"
                time.sleep(1.0)
        raise AssertionError(f"the Ray head did not answer in {timeout} s")

    def client(self, token: str | None = "own") -> Any:
        from ray.job_submission import JobSubmissionClient

        token = self.token if token == "own" else token
        headers = {"Authorization": f"Bearer {token}"} if token else None
        return JobSubmissionClient(self.address, headers=headers)

    def stop(self) -> None:
        """Stop the head and everything it started; always ends with none of them left."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(45)
        deadline = time.monotonic() + 10
        while (left := processes_with_env("GMNM_TEST_RAY_MARKER", self.marker)) and (
            time.monotonic() < deadline
        ):
            for pid in left:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
