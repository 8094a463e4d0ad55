"""Bad inputs: each one answered with a 4xx that names the problem, and nothing stored changes.

Every case runs against a real server with two API keys. Before and after each request the
database rows (files, jobs, events, checkpoints) and every file under the data directory are
snapshotted and compared, so a refusal that leaves a half-written file or a queued job behind
fails the test. Conversions run the real engine (`gmnm-convert`); fine-tunes and evaluations run
the protocol-following fake job, which is enough for objects that must merely exist.
"""

from __future__ import annotations

import io
import json
import pickle
import socket
import struct
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from reliability_helpers import (
    KEY_A,
    KEY_B,
    ServerProcess,
    auth,
    fake_commands,
    record,
    server_env,
    state_difference,
    stored_state,
    wait_job,
)

pytestmark = pytest.mark.slow

UPLOAD_LIMIT = 256 * 1024
GOOD_JSONL = b"".join(
    json.dumps({"text": f"example {i}", "label": i % 2}).encode() + b"\n" for i in range(8)
)


@dataclass
class Tally:
    tried: int = 0
    failed: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    result = Tally()
    yield result
    record(
        "bad_inputs",
        {
            "tried": result.tried,
            "failed_or_changed_state": len(result.failed),
            "failures": result.failed,
            "cases": result.names,
        },
    )


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory models may be loaded from: one model that needs remote code."""
    root = tmp_path_factory.mktemp("models")
    remote = root / "needs-remote-code"
    remote.mkdir()
    config = {
        "model_type": "my-custom-arch",
        "architectures": ["MyCustomModel"],
        "auto_map": {"AutoModel": "modeling_custom.MyCustomModel"},
    }
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("bad-inputs")
    commands = fake_commands()
    commands["conversion"] = [sys.executable, "-m", "training.cli", "convert"]
    env = server_env(
        GMNM_JOB_COMMANDS=json.dumps(commands),
        GMNM_MODEL_DIRS=str(models_dir),
        GMNM_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
        GMNM_MAX_STEPS="1000",
        GMNM_CACHE_DIR=str(root / "cache"),
    )
    server = ServerProcess(root / "data", env).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def objects(server: ServerProcess) -> dict[str, str]:
    """Key A's file, finished fine-tune and checkpoint; key B's file and checkpoint."""
    found = {}
    for owner, key in (("a", KEY_A), ("b", KEY_B)):
        http = httpx.Client(base_url=server.url, headers=auth(key), timeout=60)
        file_id = http.post("/v1/files", files={"file": ("train.jsonl", GOOD_JSONL)}).json()["id"]
        body = {"model": "org/model", "training_file": file_id, "hyperparameters": {"max_steps": 2}}
        job = http.post("/v1/fine_tuning/jobs", json=body).json()
        done = wait_job(http, f"/v1/fine_tuning/jobs/{job['id']}")
        assert done["status"] == "succeeded", done
        found[f"file_{owner}"] = file_id
        found[f"job_{owner}"] = job["id"]
        found[f"checkpoint_{owner}"] = done["checkpoint_id"]
    return found


def refused(
    server: ServerProcess,
    tally: Tally,
    name: str,
    send: Callable[[httpx.Client], httpx.Response],
    status: int,
    names: str,
) -> dict[str, Any]:
    """Send one bad request with key A; check the status, the envelope, the message naming the
    problem (`names`, case-insensitive) and that nothing stored changed."""
    http = httpx.Client(base_url=server.url, headers=auth(KEY_A), timeout=60)
    before = stored_state(server.data_dir)
    response = send(http)
    after = stored_state(server.data_dir)
    tally.tried += 1
    tally.names.append(name)
    problems = []
    if response.status_code != status:
        problems.append(f"status {response.status_code}, expected {status}: {response.text[:300]}")
    try:
        error = response.json()["error"]
        if names.lower() not in error["message"].lower():
            problems.append(f"message does not name {names!r}: {error['message']!r}")
    except (ValueError, KeyError, TypeError):
        problems.append(f"not the error envelope: {response.text[:300]}")
    changed = state_difference(before, after)
    if changed:
        problems.append(f"stored state changed: {changed}")
    if problems:
        tally.failed.append(f"{name}: {'; '.join(problems)}")
    assert not problems, f"{name}: {problems}"
    return dict(error)


# model references

LONG_REFERENCE = "org/" + "a" * 10_240
MODEL_REFERENCES = [
    ("url", "https://huggingface.co/bert-base-uncased", "URL"),
    ("url-scheme-less", "www.example.com/model", "URL"),
    ("absolute-path", "/etc", "outside the directories"),
    ("dot-dot-path", "../../etc/passwd", ".."),
    ("dot-dot-local", "local-dir:../secrets", ".."),
    ("empty", "", "empty"),
    ("ten-kilobytes", LONG_REFERENCE, "at most 1024 characters"),
    ("missing-checkpoint", "ftckpt-000000000000000000000000", "no checkpoint"),
]


@pytest.mark.parametrize(
    "reference,names", [case[1:] for case in MODEL_REFERENCES], ids=[c[0] for c in MODEL_REFERENCES]
)
@pytest.mark.parametrize("route", ["/v1/conversions", "/v1/fine_tuning/jobs", "/v1/evaluations"])
def test_bad_model_reference_is_refused_naming_it(
    server: ServerProcess,
    tally: Tally,
    objects: dict[str, str],
    route: str,
    reference: str,
    names: str,
) -> None:
    body: dict[str, Any] = {"model": reference}
    if route == "/v1/fine_tuning/jobs":
        body["training_file"] = objects["file_a"]
    if route == "/v1/evaluations":
        body["file"] = objects["file_a"]
    error = refused(
        server,
        tally,
        f"model {reference[:40]!r} at {route}",
        lambda h: h.post(route, json=body),
        400,
        names,
    )
    assert error["param"] == "model"


def test_a_missing_directory_inside_the_model_directories_is_refused(
    server: ServerProcess, tally: Tally, models_dir: Path
) -> None:
    missing = str(models_dir / "no-such-model")
    refused(
        server,
        tally,
        "model: missing local directory",
        lambda http: http.post("/v1/conversions", json={"model": missing}),
        400,
        "does not exist",
    )


def test_a_model_that_needs_remote_code_is_refused_before_any_job(
    server: ServerProcess, tally: Tally, models_dir: Path
) -> None:
    remote = str(models_dir / "needs-remote-code")
    error = refused(
        server,
        tally,
        "model: needs remote code",
        lambda http: http.post("/v1/conversions", json={"model": remote}),
        400,
        "remote code",
    )
    assert error["code"] == "remote_code_refused"


def test_a_hub_model_that_does_not_exist_fails_its_job_with_model_not_found(
    server: ServerProcess, tally: Tally
) -> None:
    # Whether a hub id exists is known only to the hub (or its local cache); the API does not
    # call out while it holds the queue, so the job finds out, in seconds, and says so.
    http = httpx.Client(base_url=server.url, headers=auth(KEY_A), timeout=60)
    created = http.post("/v1/conversions", json={"model": "nobody-here/no-such-model"})
    assert created.status_code == 202, created.text
    job = wait_job(http, created.headers["location"], timeout=180)
    tally.tried += 1
    tally.names.append("model: hub id that does not exist (job fails)")
    if job["status"] != "failed" or job["error"]["code"] != "model_not_found":
        tally.failed.append(f"hub id that does not exist: {job}")
    assert job["status"] == "failed" and job["error"]["code"] == "model_not_found", job
    assert "nobody-here/no-such-model" in job["error"]["message"]
    assert not job["checkpoint_id"]


# tasks and hyperparameters

FINE_TUNE_FIELDS = [
    ("unknown-task", {"task": "translation"}, "task"),
    ("epochs-negative", {"hyperparameters": {"n_epochs": -1}}, "n_epochs"),
    ("epochs-wrong-type", {"hyperparameters": {"n_epochs": "many"}}, "n_epochs"),
    ("batch-size-zero", {"hyperparameters": {"batch_size": 0}}, "batch_size"),
    ("batch-size-float", {"hyperparameters": {"batch_size": 2.5}}, "batch_size"),
    ("lr-multiplier-negative", {"hyperparameters": {"learning_rate_multiplier": -2}}, "learning"),
    ("lr-multiplier-text", {"hyperparameters": {"learning_rate_multiplier": "fast"}}, "learning"),
    ("learning-rate-huge", {"hyperparameters": {"learning_rate": 1e9}}, "learning_rate"),
    ("max-steps-zero", {"hyperparameters": {"max_steps": 0}}, "max_steps"),
    ("max-steps-over-limit", {"hyperparameters": {"max_steps": 10**9}}, "GMNM_MAX_STEPS"),
    ("warmup-ratio-over-one", {"hyperparameters": {"warmup_ratio": 2.0}}, "warmup_ratio"),
    ("unknown-hyperparameter", {"hyperparameters": {"learnin_rate": 0.1}}, "learnin_rate"),
    ("accumulation-list", {"hyperparameters": {"gradient_accumulation_steps": [2]}}, "gradient"),
    ("seed-text", {"seed": "lucky"}, "seed"),
    ("unknown-field", {"epochs": 3}, "epochs"),
    ("validation-fraction-one", {"data": {"validation_fraction": 1.0}}, "validation_fraction"),
    ("num-components-zero", {"conversion": {"gmnm": {"num_components": 0}}}, "num_components"),
    ("max-minutes-negative", {"limits": {"max_minutes": -5}}, "max_minutes"),
]


@pytest.mark.parametrize(
    "fields,names", [case[1:] for case in FINE_TUNE_FIELDS], ids=[c[0] for c in FINE_TUNE_FIELDS]
)
def test_bad_fine_tune_field_is_refused_naming_it(
    server: ServerProcess,
    tally: Tally,
    objects: dict[str, str],
    fields: dict[str, Any],
    names: str,
) -> None:
    body = {"model": "org/model", "training_file": objects["file_a"], **fields}
    refused(
        server,
        tally,
        f"fine-tune field {json.dumps(fields)[:60]}",
        lambda http: http.post("/v1/fine_tuning/jobs", json=body),
        400,
        names,
    )


def test_a_body_that_is_not_json_is_refused(server: ServerProcess, tally: Tally) -> None:
    refused(
        server,
        tally,
        "body: not JSON",
        lambda http: http.post(
            "/v1/conversions", content=b"{model: x", headers={"Content-Type": "application/json"}
        ),
        400,
        "JSON",
    )


# data files


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def _zip(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in entries:
            archive.writestr(name, content)
    return buffer.getvalue()


def _declared_bomb() -> bytes:
    """A small zip whose entries declare 4 GiB each: its headers lie about the size."""
    data = bytearray(_zip([("cats/1.png", _png()), ("dogs/2.png", _png())]))
    huge = struct.pack("<I", 0xFFFFFFF0)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (found := data.find(signature, start)) >= 0:
            data[found + offset : found + offset + 4] = huge
            start = found + 4
    return bytes(data)


def _deflate_bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("cats/1.png", b"\0" * (32 * 1024 * 1024))
        archive.writestr("dogs/2.png", _png())
    return buffer.getvalue()


DATA_FILES = [
    ("empty", "train.jsonl", b"", "empty"),
    ("truncated-jsonl", "train.jsonl", GOOD_JSONL[:-9], "line 8"),
    ("truncated-csv", "train.csv", b'text,label\n"good,1\n', "line"),
    ("truncated-zip", "images.zip", _zip([("a/1.png", _png()), ("b/2.png", _png())])[:-40], "zip"),
    ("json-lines-named-csv", "train.csv", GOOD_JSONL, "looks like JSON"),
    ("png-named-jsonl", "train.jsonl", _png(), "UTF-8"),
    ("csv-named-jsonl", "train.jsonl", b"text,label\ngood,1\n", "not valid JSON"),
    ("label-missing-on-a-line", "train.jsonl", GOOD_JSONL + b'{"text": "x"}\n', "line 9"),
    (
        "label-of-the-wrong-kind",
        "train.jsonl",
        GOOD_JSONL + b'{"text": "x", "label": {}}\n',
        "label",
    ),
    ("label-cell-empty", "train.csv", b"text,label\ngood,1\nbad,\n", "line 3"),
    ("zip-dot-dot-member", "images.zip", _zip([("../../evil/1.png", _png())]), ".."),
    ("zip-absolute-member", "images.zip", _zip([("/tmp/evil/1.png", _png())]), "absolute"),
    ("zip-bomb-declared-size", "images.zip", _declared_bomb(), "bytes, more than the limit"),
    ("zip-bomb-deflate", "images.zip", _deflate_bomb(), "zip bomb"),
    ("pickle", "train.pkl", pickle.dumps({"text": ["a"], "label": [1]}), "pickle"),
    ("pickle-as-text", "train.txt", pickle.dumps([{"text": "a"}], protocol=4), "pickle"),
    ("pickle-protocol-0", "data.pickle", pickle.dumps({"text": "a"}, protocol=0), "pickle"),
]


@pytest.mark.parametrize(
    "filename,content,names", [c[1:] for c in DATA_FILES], ids=[c[0] for c in DATA_FILES]
)
def test_bad_data_file_upload_is_refused_naming_it(
    server: ServerProcess, tally: Tally, filename: str, content: bytes, names: str
) -> None:
    error = refused(
        server,
        tally,
        f"data file {filename} ({len(content)} bytes)",
        lambda http: http.post("/v1/files", files={"file": (filename, content)}),
        400,
        names,
    )
    assert error["param"] == "file"


@pytest.mark.parametrize(
    "filename", ["..", ".", "/", "a/../..", "x" * 300 + ".jsonl", "a\0b.jsonl"]
)
def test_an_upload_name_with_path_tricks_is_stored_under_a_safe_name(
    server: ServerProcess, filename: str
) -> None:
    http = httpx.Client(base_url=server.url, headers=auth(KEY_A), timeout=60)
    response = http.post("/v1/files", files={"file": (filename, GOOD_JSONL)})
    assert response.status_code in (200, 400), response.text
    if response.status_code == 200:
        stored = response.json()["filename"]
        assert "/" not in stored and stored not in ("", ".", "..") and len(stored.encode()) <= 200
        assert http.delete(f"/v1/files/{response.json()['id']}").status_code == 200
    assert not list((server.data_dir / "files").glob(".*")), "an upload left a scratch file"


# ids that do not exist or belong to another key


def test_ids_that_do_not_exist_or_belong_to_another_key_are_404_or_400(
    server: ServerProcess, tally: Tally, objects: dict[str, str]
) -> None:
    other_file, other_checkpoint = objects["file_b"], objects["checkpoint_b"]
    for label, object_id in (("missing", "x-does-not-exist"), ("another key's", None)):
        file_id = object_id or other_file
        checkpoint_id = object_id or other_checkpoint
        for what, method, path in (
            ("file", "GET", f"/v1/files/{file_id}"),
            ("file content", "GET", f"/v1/files/{file_id}/content"),
            ("file delete", "DELETE", f"/v1/files/{file_id}"),
            ("checkpoint", "GET", f"/v1/checkpoints/{checkpoint_id}"),
            ("checkpoint content", "GET", f"/v1/checkpoints/{checkpoint_id}/content"),
            ("checkpoint curves", "GET", f"/v1/checkpoints/{checkpoint_id}/curves.png"),
            ("job", "GET", f"/v1/fine_tuning/jobs/{object_id or objects['job_b']}"),
            ("job cancel", "POST", f"/v1/fine_tuning/jobs/{object_id or objects['job_b']}/cancel"),
        ):
            refused(
                server,
                tally,
                f"{label} {what} id",
                lambda http, m=method, p=path: http.request(m, p),
                404,
                "no ",
            )
        for what, body, names in (
            ("training_file", {"model": "org/model", "training_file": file_id}, "training_file"),
            (
                "validation_file",
                {"model": "org/model", "dataset": "digits", "validation_file": file_id},
                "validation_file",
            ),
            ("checkpoint as model", {"model": checkpoint_id, "dataset": "digits"}, "model"),
        ):
            if what == "checkpoint as model" and object_id is not None:
                body["model"] = "ftckpt-" + "0" * 24
            refused(
                server,
                tally,
                f"{label} {what} in a fine-tune",
                lambda http, b=body: http.post("/v1/fine_tuning/jobs", json=b),
                400,
                names,
            )


# uploads over the limit


def test_an_upload_declared_over_the_limit_gets_413_before_its_body_is_sent(
    server: ServerProcess, tally: Tally
) -> None:
    before = stored_state(server.data_dir)
    head = (
        "POST /v1/files HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {KEY_A}\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\n"
        f"Content-Length: {100 * UPLOAD_LIMIT}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(head.encode() + b"--xyz\r\n")  # and none of the rest of the body
        answer = b""
        while b"GMNM_MAX_UPLOAD_BYTES" not in answer and (chunk := connection.recv(65536)):
            answer += chunk
    tally.tried += 1
    tally.names.append("upload declared 100x the limit")
    ok = answer.startswith(b"HTTP/1.1 413") and b"GMNM_MAX_UPLOAD_BYTES" in answer
    if not ok or state_difference(before, stored_state(server.data_dir)):
        tally.failed.append(f"declared oversize upload: {answer[:200]!r}")
    assert ok, answer[:300]
    assert not state_difference(before, stored_state(server.data_dir))


def test_a_streamed_upload_over_the_limit_gets_413_and_leaves_no_partial_file(
    server: ServerProcess, tally: Tally
) -> None:
    def body() -> Iterator[bytes]:
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        for _ in range(4 * UPLOAD_LIMIT // 65536):
            yield b'{"text": "x", "label": 1}\n' * 2520
        yield b"\r\n--xyz--\r\n"

    refused(
        server,
        tally,
        "upload streamed without a length, 4x the limit",
        lambda http: http.post(
            "/v1/files",
            content=body(),
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        ),
        413,
        "upload limit",
    )
