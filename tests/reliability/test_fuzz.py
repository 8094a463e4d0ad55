"""Schema fuzzing: schemathesis drives every operation of a running server from its OpenAPI schema.

Every operation is fuzzed four ways: schema-valid requests with a valid key (random ids),
schema-valid requests with a valid key and the ids of objects that exist (so the handlers behind
the 404s run too), schema-violating requests with a valid key, and schema-valid requests without
a key. No answer may be a 5xx, every error must be the one envelope, and every answer must match
the schema (status, content type, headers, body). Generation is derandomised, so a run is
repeatable; the number of cases is bounded per operation.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from reliability_helpers import KEY_A, ServerProcess, auth, record, server_env, wait_job
from schemathesis import GenerationMode
from schemathesis import checks as st_checks

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 25
EXAMPLES_WITHOUT_KEY = 5
OPEN_OPERATIONS = {"GET /healthz"}

# Schemathesis's checks that apply to this API. `positive_data_acceptance` is left out: a
# request can match the schema and still be refused for what it means (an empty upload, a
# model reference that is a URL); `envelope` below checks those refusals instead.
CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_headers_conformance,
    st_checks.response_schema_conformance,
    st_checks.negative_data_rejection,
    st_checks.missing_required_header,
    st_checks.unsupported_method,
]


def envelope_problem(label: str, response: Any) -> str | None:
    """Why an error answer is not the one envelope, or None when it is (or is not an error).

    The readiness probe's 503 is the exception: it carries the checks that failed, as
    documented in the schema.
    """
    if response.status_code < 400 or (label, response.status_code) == ("GET /readyz", 503):
        return None
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} with a body that is not JSON: {response.text[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(body) != {"error"}:
        return f"{response.status_code} without the error envelope: {body!r:.200}"
    if not isinstance(error.get("message"), str) or not error["message"]:
        return f"{response.status_code} with an empty message: {body!r:.200}"
    if not isinstance(error.get("type"), str) or set(error) != {"message", "type", "param", "code"}:
        return f"{response.status_code} with envelope fields {sorted(error)}"
    return None


def negatable(operation: Any) -> bool:
    """Whether a schema-violating request exists: a body, or a parameter that is not free text.

    Path and header parameters that accept any string cannot be given a wrong value, and
    hypothesis would search in vain for one.
    """
    definition = operation.definition.raw
    if definition.get("requestBody"):
        return True
    for parameter in definition.get("parameters", []):
        schema = parameter.get("schema", {})
        variants = schema.get("anyOf", [schema])
        if any(variant.get("type") not in (None, "string", "null") for variant in variants):
            return True
    return False


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("fuzz")
    env = server_env(GMNM_MAX_UPLOAD_BYTES=str(1 << 20))
    server = ServerProcess(root / "data", env).start()
    yield server
    server.stop()


def existing_objects(server: ServerProcess) -> dict[str, str]:
    """One object of each kind for key A: a file, a job of each kind, a checkpoint."""
    http = httpx.Client(base_url=server.url, headers=auth(KEY_A), timeout=60)
    content = b'{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n'
    file_id = http.post("/v1/files", files={"file": ("train.jsonl", content)}).json()["id"]
    body = {"model": "org/model", "training_file": file_id, "hyperparameters": {"max_steps": 4}}
    fine_tune = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    conversion = http.post("/v1/conversions", json={"model": "org/model"}).json()["id"]
    evaluation = http.post("/v1/evaluations", json={"model": "org/model", "file": file_id})
    job = wait_job(http, f"/v1/fine_tuning/jobs/{fine_tune}")
    assert job["status"] == "succeeded", job
    wait_job(http, f"/v1/conversions/{conversion}")
    wait_job(http, f"/v1/evaluations/{evaluation.json()['id']}")
    return {
        "file_id": file_id,
        "checkpoint_id": job["checkpoint_id"],
        "job_id:/v1/fine_tuning": fine_tune,
        "job_id:/v1/conversions": conversion,
        "job_id:/v1/evaluations": evaluation.json()["id"],
    }


def real_path_parameters(operation: Any, objects: dict[str, str]) -> dict[str, str] | None:
    names = [p["name"] for p in operation.definition.raw.get("parameters", []) if p["in"] == "path"]
    if not names:
        return None
    values = {}
    for name in names:
        key = name
        if name == "job_id":
            key = next(k for k in objects if k.startswith("job_id:") and k[7:] in operation.path)
        values[name] = objects[key]
    return values


class Fuzzer:
    """Runs bounded, derandomised schemathesis cases against the server and tallies them."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        self.session = httpx.Client(timeout=60)
        self.cases: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.statuses: collections.Counter[int] = collections.Counter()

    def operations(self) -> list[Any]:
        return [result.ok() for result in self.schema.get_all_operations()]

    def run(
        self,
        operation: Any,
        group: str,
        mode: GenerationMode,
        key: str | None,
        examples: int,
        path_parameters: dict[str, str] | None = None,
    ) -> None:
        strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)
        headers = auth(key)

        @settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        @given(case=strategy)
        def one_case(case: Any) -> None:
            self.cases[group] += 1
            case.headers = {**(case.headers or {}), **headers}
            try:
                response = case.call(base_url=self.server.url, timeout=60)
            except Exception as error:  # a broken connection or a timeout is a failure too
                self.failures.append(f"{operation.label} [{group}] {type(error).__name__}: {error}")
                return
            self.statuses[response.status_code] += 1
            problem = envelope_problem(operation.label, response)
            needs_key = key is None and operation.label not in OPEN_OPERATIONS
            if needs_key and response.status_code != 401:
                problem = problem or f"answered {response.status_code} without a key"
            try:
                case.validate_response(response, checks=CHECKS, headers=case.headers)
            except BaseException as failure:  # schemathesis raises an exception group
                problem = problem or str(failure).split("Reproduce with")[0].strip()[:600]
            if problem is not None:
                self.failures.append(f"{operation.label} [{group}] {problem}\n  {case!r:.300}")

        # Unsatisfiable: nothing of this kind can be generated for the operation.
        with contextlib.suppress(hypothesis.errors.Unsatisfiable):
            one_case()


def test_every_operation_fuzzed_answers_within_its_schema_with_the_envelope_and_no_5xx(
    server: ServerProcess,
) -> None:
    started = time.monotonic()
    fuzzer = Fuzzer(server)
    objects = existing_objects(server)
    operations = fuzzer.operations()
    negative_skipped = []
    for operation in operations:
        fuzzer.run(operation, "valid key", GenerationMode.POSITIVE, KEY_A, EXAMPLES_PER_OPERATION)
        real = real_path_parameters(operation, objects)
        if real is not None:
            fuzzer.run(
                operation,
                "valid key, existing ids",
                GenerationMode.POSITIVE,
                KEY_A,
                EXAMPLES_PER_OPERATION,
                path_parameters=real,
            )
        if negatable(operation):
            fuzzer.run(
                operation,
                "valid key, schema-violating",
                GenerationMode.NEGATIVE,
                KEY_A,
                EXAMPLES_PER_OPERATION,
            )
        else:
            negative_skipped.append(operation.label)
        fuzzer.run(operation, "no key", GenerationMode.POSITIVE, None, EXAMPLES_WITHOUT_KEY)

    total = sum(fuzzer.cases.values())
    record(
        "fuzz",
        {
            "operations": len(operations),
            "cases": total,
            "cases_by_group": dict(fuzzer.cases),
            "statuses": {str(status): n for status, n in sorted(fuzzer.statuses.items())},
            "failed": len(fuzzer.failures),
            "failures": fuzzer.failures[:20],
            "operations_without_schema_violating_inputs": negative_skipped,
            "examples_per_operation": EXAMPLES_PER_OPERATION,
            "seconds": round(time.monotonic() - started, 1),
        },
    )
    assert len(operations) >= 30
    assert total >= len(operations) * EXAMPLES_WITHOUT_KEY
    assert not fuzzer.failures, f"{len(fuzzer.failures)} failed cases:\n" + "\n".join(
        sorted(set(fuzzer.failures))[:15]
    )
    assert not any(status >= 500 for status in fuzzer.statuses)


def test_error_responses_in_the_schema_are_the_envelope_and_no_422_is_promised(
    server: ServerProcess,
) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, f"{method} {path} documents 422; errors are 400"
            for status, response in responses.items():
                if int(status) >= 400 and (path, status) != ("/readyz", "503"):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorResponse"), (method, path, status)
            if path != "/healthz":
                assert operation.get("security"), f"{method} {path} does not say it needs a key"
    assert schema["components"]["securitySchemes"]
