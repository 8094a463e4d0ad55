"""Prometheus metrics: request latency per route, and jobs by status read from the database."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.requests import Request
from starlette.responses import Response

from service.db import JOB_STATUSES, QUEUED, Database, Job

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _JobCollector(Collector):
    def __init__(self, database: Database) -> None:
        self.db = database

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self.db.read() as session:
            counts = dict(
                session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            )
        by_status = GaugeMetricFamily("gmnm_jobs", "Jobs by status.", labels=["status"])
        for status in JOB_STATUSES:
            by_status.add_metric([status], float(counts.get(status, 0)))
        yield by_status
        yield GaugeMetricFamily(
            "gmnm_queue_depth", "Jobs waiting for a device.", value=float(counts.get(QUEUED, 0))
        )


class ServiceMetrics:
    def __init__(self, database: Database) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "gmnm_request_duration_seconds",
            "Time to answer an HTTP request, by route template.",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_JobCollector(database))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def middleware(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        self.latency.labels(
            request.method, _route_template(request), str(response.status_code)
        ).observe(time.perf_counter() - started)
        return response


def _route_template(request: Request) -> str:
    # Label by template, never by the raw path, so ids do not explode the label set.
    route: Any = request.scope.get("route")
    return str(getattr(route, "path", None) or "unmatched")
