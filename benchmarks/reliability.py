"""Reliability report: runs the reliability tests and collects what each one measured.

    python benchmarks/reliability.py [--out benchmarks/results/reliability.json] [-- PYTEST ARGS]

The tests in `tests/reliability` write what they counted (cases fuzzed, bad inputs tried, faults
injected, requests under load, and the failures they tallied themselves) to the directory named
by GMNM_RELIABILITY_REPORT; this script sets it, runs pytest, reads the per-test outcomes from a
JUnit file, and writes one JSON report. A fault or auth test checks its guarantee (nothing lost,
every checkpoint intact, no key stored) with assertions, so those count as failed from the
test's outcome, not from a figure the test reports. A plain `pytest` run writes no report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "reliability.json"
FAULTS = (
    "fault_job_sigkill",
    "fault_job_sigkill_every_attempt",
    "fault_server_sigkill_during_checkpoint",
    "fault_disk_full",
    "fault_database_locked_3s",
    "fault_database_locked_past_timeout",
)


def run_tests(report_dir: Path, extra: list[str]) -> tuple[int, dict[str, str], float]:
    junit = report_dir / "junit.xml"
    env = {**os.environ, "GMNM_RELIABILITY_REPORT": str(report_dir)}
    command = [sys.executable, "-m", "pytest", "tests/reliability", "-q", "-p", "no:cacheprovider"]
    command += [f"--junitxml={junit}", *extra]
    started = time.monotonic()
    status = subprocess.run(command, cwd=ROOT, env=env).returncode
    seconds = time.monotonic() - started
    outcomes: dict[str, str] = {}
    if junit.is_file():
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed"
                elif child.tag == "skipped":
                    outcome = "skipped"
            outcomes[name] = outcome
    return status, outcomes, seconds


def read_sections(report_dir: Path) -> dict[str, Any]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(report_dir.glob("*.json"))}


def summarise(sections: dict[str, Any], outcomes: dict[str, str]) -> dict[str, Any]:
    fuzz = sections.get("fuzz", {})
    bad = sections.get("bad_inputs", {})
    load = sections.get("load", {})
    fault_tests = {name: outcome for name, outcome in outcomes.items() if "test_faults" in name}
    auth_tests = {name: outcome for name, outcome in outcomes.items() if "test_auth" in name}
    return {
        "cases_fuzzed": fuzz.get("cases"),
        "fuzz_failures": fuzz.get("failed"),
        "bad_inputs_tried": bad.get("tried"),
        "bad_inputs_failed_or_changed_state": bad.get("failed_or_changed_state"),
        # a fault test that failed wrote no section; it injected at least one fault all the same
        "faults_injected": sum(sections.get(name, {}).get("injected", 0) for name in FAULTS)
        + sum(1 for outcome in fault_tests.values() if outcome == "failed"),
        "fault_tests_failed_or_lost_data": sum(
            1 for outcome in fault_tests.values() if outcome != "passed"
        ),
        "requests_under_load": load.get("requests"),
        "load_failed_requests": load.get("failed"),
        "load_jobs_lost": load.get("jobs_lost"),
        "load_jobs_duplicated": load.get("jobs_duplicated"),
        "load_p50_ms": load.get("latency_ms", {}).get("all", {}).get("p50"),
        "load_p99_ms": load.get("latency_ms", {}).get("all", {}).get("p99"),
        "auth_requests_refused_as_expected": sum(
            sections.get(name, {}).get("requests", 0)
            for name in ("auth_missing_or_wrong_key", "auth_other_tenant")
        ),
        "auth_tests_failed": sum(1 for outcome in auth_tests.values() if outcome != "passed"),
        "key_places_searched": sections.get("auth_keys_not_stored", {}).get("places_searched"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        report_dir = Path(directory)
        status, outcomes, seconds = run_tests(report_dir, args.pytest_args)
        sections = read_sections(report_dir)
    summary = summarise(sections, outcomes)
    report = {
        "generated_by": "benchmarks/reliability.py (runs tests/reliability)",
        "pytest_exit_status": status,
        "seconds": round(seconds, 1),
        "summary": summary,
        "tests": {
            "passed": sum(1 for o in outcomes.values() if o == "passed"),
            "failed": sorted(n for n, o in outcomes.items() if o == "failed"),
            "skipped": sorted(n for n, o in outcomes.items() if o == "skipped"),
        },
        "sections": sections,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    for name, value in summary.items():
        print(f"{name:40s} {value}")
    print(f"tests: {report['tests']['passed']} passed, {len(report['tests']['failed'])} failed")
    print(f"wrote {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
