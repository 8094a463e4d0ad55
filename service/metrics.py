"""Prometheus metrics: request latency per route, and jobs by status read from the database."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """Times every HTTP request (a plain ASGI wrapper: no extra task per request)."""

        async def timed(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            started = time.perf_counter()
            status = 500

            async def send_and_note(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                await send(message)

            try:
                await app(scope, receive, send_and_note)
            finally:
                self.latency.labels(
                    scope.get("method", ""), _route_template(scope), str(status)
                ).observe(time.perf_counter() - started)

        return timed


def _route_template(scope: Scope) -> str:
    # Label by template, never by the raw path, so ids do not explode the label set.
    route: Any = scope.get("route")
    return str(getattr(route, "path", None) or "unmatched")
