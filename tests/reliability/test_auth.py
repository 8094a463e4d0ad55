"""Auth: every route refuses a missing or wrong key, hides another tenant's objects, never logs or
stores a key, and compares keys in constant time.

The timing check is a randomisation test: wrong keys that share no prefix with a real key and
wrong keys that share all but the last character are tried in a random order, and a rank-sum
statistic asks whether the two groups' times differ. Because the order is random, the test's
false-alarm rate is the chosen alpha whatever the machine's load does meanwhile; a deliberately
leaky comparison run through the same procedure shows that the measurement can see a leak.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import math
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from reliability_helpers import (
    KEY_A,
    KEY_B,
    WRONG_KEY,
    ServerProcess,
    auth,
    record,
    server_env,
    wait_job,
)

from service.auth import KeyRing
from service.errors import ApiError
from service.settings import digest_key_entry

pytestmark = pytest.mark.slow

OPEN_ROUTES = {("GET", "/healthz")}
# |z| of the rank-sum statistic past which timing is called dependent: a false alarm once in
# about 150,000 runs when there is no dependence.
Z_ALARM = 4.5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("auth")
    server = ServerProcess(root / "data", server_env()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def owned(server: ServerProcess) -> dict[str, str]:
    """Key A's objects: a file, a job of each kind, a checkpoint."""
    http = httpx.Client(base_url=server.url, headers=auth(KEY_A), timeout=60)
    content = b'{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n'
    file_id = http.post("/v1/files", files={"file": ("train.jsonl", content)}).json()["id"]
    body = {"model": "org/model", "training_file": file_id, "hyperparameters": {"max_steps": 2}}
    fine_tune = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    conversion = http.post("/v1/conversions", json={"model": "org/model"}).json()["id"]
    evaluation = http.post("/v1/evaluations", json={"model": "org/model", "file": file_id})
    job = wait_job(http, f"/v1/fine_tuning/jobs/{fine_tune}")
    return {
        "file_id": file_id,
        "checkpoint_id": job["checkpoint_id"],
        "/v1/fine_tuning/jobs": fine_tune,
        "/v1/conversions": conversion,
        "/v1/evaluations": evaluation.json()["id"],
    }


def routes(server: ServerProcess, owned: dict[str, str]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every operation in the schema with key A's ids in its path and a plausible body."""
    schema = httpx.get(f"{server.url}/openapi.json").json()
    found = []
    for template, operations in schema["paths"].items():
        for method in operations:
            path = template.replace("{file_id}", owned["file_id"])
            path = path.replace("{checkpoint_id}", owned["checkpoint_id"])
            if "{job_id}" in path:
                prefix = template.split("/{job_id}")[0]
                path = path.replace("{job_id}", owned[prefix])
            body: dict[str, Any] = {}
            if method == "post" and template == "/v1/files":
                body = {"files": {"file": ("t.jsonl", b'{"text": "a"}\n')}}
            elif method == "post" and "{" not in template:
                body = {"json": {"model": "org/model", "training_file": owned["file_id"]}}
                if template != "/v1/fine_tuning/jobs":
                    body = {"json": {"model": "org/model"}}
            found.append((method.upper(), path, body))
    return found


def test_every_route_refuses_a_missing_or_wrong_key_with_401(
    server: ServerProcess, owned: dict[str, str]
) -> None:
    checked = 0
    for method, path, body in routes(server, owned):
        if (method, path) in OPEN_ROUTES:
            continue
        for headers in ({}, auth(WRONG_KEY), {"Authorization": KEY_A}, {"Authorization": "Bearer"}):
            response = httpx.request(method, f"{server.url}{path}", headers=headers, **body)
            assert response.status_code == 401, (method, path, headers, response.text)
            error = response.json()["error"]
            assert error["type"] == "authentication_error" and "API key" in error["message"]
            assert response.headers["www-authenticate"] == "Bearer"
            checked += 1
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    record("auth_missing_or_wrong_key", {"requests": checked})


def test_another_tenant_sees_none_of_the_objects_of_a_key(
    server: ServerProcess, owned: dict[str, str]
) -> None:
    other = httpx.Client(base_url=server.url, headers=auth(KEY_B), timeout=60)
    checked = 0
    for method, path, body in routes(server, owned):
        if (method, path) in OPEN_ROUTES or path in ("/readyz", "/metrics"):
            continue
        response = other.request(method, path, **body)
        checked += 1
        if any(object_id in path for object_id in owned.values()):
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"]["code"] == "not_found"
        elif method == "GET":
            assert response.status_code == 200, (method, path, response.text)
            listed = json.dumps(response.json())
            assert not any(object_id in listed for object_id in owned.values()), (path, listed)
        else:  # creates: a fine-tune naming key A's file is refused as if the file did not exist
            if "fine_tuning" in path:
                assert response.status_code == 400 and "training_file" in response.text
    # key A still sees everything it owns
    mine = httpx.Client(base_url=server.url, headers=auth(KEY_A), timeout=60)
    assert mine.get(f"/v1/files/{owned['file_id']}").status_code == 200
    assert mine.get(f"/v1/checkpoints/{owned['checkpoint_id']}").status_code == 200
    record("auth_other_tenant", {"requests": checked})


def test_keys_appear_in_neither_the_server_log_nor_the_database_nor_any_stored_file(
    server: ServerProcess, owned: dict[str, str]
) -> None:
    # make sure every kind of request has gone through the log, including refused ones
    for headers in (auth(KEY_A), auth(KEY_B), auth(WRONG_KEY)):
        httpx.get(f"{server.url}/v1/files", headers=headers)
        httpx.post(f"{server.url}/v1/conversions", headers=headers, json={"model": "https://x"})
    log = server.log.read_bytes()
    assert b"GET /v1/files" in log, "the access log is not where the test looks"
    haystacks = {"server log": log}
    for path in server.data_dir.rglob("*"):
        if path.is_file():
            haystacks[str(path.relative_to(server.data_dir))] = path.read_bytes()
    for key in (KEY_A, KEY_B, WRONG_KEY):
        for secret in (key.encode(), key[len(key) // 2 :].encode()):
            leaked = [name for name, content in haystacks.items() if secret in content]
            assert not leaked, f"key text found in {leaked}"
    record("auth_keys_not_stored", {"places_searched": len(haystacks)})


# constant-time comparison


def rank_sum_z(first: list[float], second: list[float]) -> float:
    """The Mann-Whitney rank-sum statistic of `first` against `second`, as a z score."""
    pooled = sorted([(value, 0) for value in first] + [(value, 1) for value in second])
    ranks = [0.0] * len(pooled)
    i = 0
    while i < len(pooled):  # ties share their mean rank
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    n1, n2 = len(first), len(second)
    rank_first = sum(rank for rank, (_, group) in zip(ranks, pooled, strict=True) if group == 0)
    expected = n1 * (n1 + n2 + 1) / 2
    spread = math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12)
    return (rank_first - expected) / spread


def timing_z(check: Callable[[str], Any], near: str, far: str, rounds: int = 3000) -> float:
    """Time `check` on two wrong keys in a random order; the rank-sum z of near against far."""
    order = random.Random(12345).choices((0, 1), k=2 * rounds)
    times: tuple[list[float], list[float]] = ([], [])
    for which in order:
        key = near if which == 0 else far
        started = time.perf_counter_ns()
        check(key)
        times[which].append(float(time.perf_counter_ns() - started))
    return rank_sum_z(times[0], times[1])


def test_key_comparison_uses_a_constant_time_compare(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = KeyRing([digest_key_entry(KEY_A), digest_key_entry(KEY_B)])
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    with pytest.raises(ApiError):
        ring.owner_for(f"Bearer {WRONG_KEY}")
    # every configured digest is compared, whether or not an earlier one matched
    assert len(calls) == 2
    calls.clear()
    assert ring.owner_for(f"Bearer {KEY_A}") == digest_key_entry(KEY_A)[:16]
    assert len(calls) == 2
    source = Path(__import__("service.auth").auth.__file__).read_text()
    assert not re.search(r"==\s*digest|digest\s*==|offered\s*==", source)


def test_wrong_key_timing_does_not_depend_on_how_much_of_the_key_matches() -> None:
    ring = KeyRing([digest_key_entry(KEY_A)])
    near = KEY_A[:-1] + ("0" if KEY_A[-1] != "0" else "1")  # all but the last character match
    far = "".join("x" if char != "x" else "y" for char in KEY_A)  # no character matches
    assert len(near) == len(far) == len(KEY_A)

    def service_check(key: str) -> None:
        with contextlib.suppress(ApiError):
            ring.owner_for(f"Bearer {key}")

    # what comparing the plain text character by character would do
    def leaky_check(key: str) -> None:
        for mine, theirs in zip(key, KEY_A, strict=True):
            if mine != theirs:
                return

    z_service = timing_z(service_check, near, far)
    z_leaky = timing_z(leaky_check, near, far)
    record(
        "auth_timing",
        {
            "rounds_per_key": 3000,
            "z_service": round(z_service, 2),
            "z_leaky_control": round(z_leaky, 2),
            "z_alarm": Z_ALARM,
        },
    )
    assert abs(z_leaky) > Z_ALARM, f"the measurement cannot see a known leak (z={z_leaky:.1f})"
    assert abs(z_service) < Z_ALARM, (
        f"wrong-key timing depends on the matching prefix ({z_service})"
    )
