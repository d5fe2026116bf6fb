"""GET /metrics: the daemon in the Prometheus text format (prometheus_client).

Counts and health are read from the daemon when scraped (jobs by state, queue, inboxes, free disk
space); durations are observed when jobs finish, so they start from zero at each daemon start, as
Prometheus counters and histograms do.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from scandrop.daemon.job_status import JobStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECONDS_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))


class Source(Protocol):
    """What the metrics read of the daemon when scraped."""

    def metric_values(self) -> dict[str, Any]: ...


class _Live(Collector):
    def __init__(self, source: Source) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        v = self.source.metric_values()
        jobs = GaugeMetricFamily("scandrop_jobs", "Jobs in the database by state.", labels=["state"])
        for state, count in v["counts"].items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily("scandrop_queue_length", "Jobs queued, not yet running.", value=v["queued"])
        yield GaugeMetricFamily("scandrop_running_jobs", "Jobs running now.", value=v["running"])
        healthy = GaugeMetricFamily(
            "scandrop_inbox_healthy", "1 when the inbox was scanned and its loop is alive.", labels=["inbox"]
        )
        waiting = GaugeMetricFamily(
            "scandrop_inbox_waiting_drops", "Drops still being copied or empty.", labels=["inbox"]
        )
        for inbox, ok, drops in v["inboxes"]:
            healthy.add_metric([inbox], 1.0 if ok else 0.0)
            waiting.add_metric([inbox], drops)
        yield healthy
        yield waiting
        free = GaugeMetricFamily(
            "scandrop_free_bytes", "Free disk space where scandrop writes.", labels=["role", "path"]
        )
        for space in v["disk"]:
            if space.free_mb is not None:
                free.add_metric([space.role, space.path], space.free_mb * 1e6)
        yield free
        yield GaugeMetricFamily(
            "scandrop_disk_ok",
            "0 while free space is below min_free_space_mb (jobs wait).",
            value=v["disk_ok"],
        )
        yield GaugeMetricFamily("scandrop_healthy", "1 when /healthz answers 200.", value=v["healthy"])
        if v["webhooks_pending"] is not None:
            yield GaugeMetricFamily(
                "scandrop_webhooks_pending",
                "Webhook deliveries not yet accepted.",
                value=v["webhooks_pending"],
            )


class Metrics:
    def __init__(self, source: Source) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.stage_seconds = Histogram(
            "scandrop_stage_seconds",
            "Seconds each pipeline stage took, per finished job.",
            ["stage"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "scandrop_job_seconds",
            "Seconds from a job's start to its end, by outcome.",
            ["state"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "scandrop_jobs_finished",
            "Jobs finished since the daemon started, by outcome and error code.",
            ["state", "code"],
            registry=self.registry,
        )
        self.registry.register(_Live(source))

    def job_finished(self, status: JobStatus) -> None:
        code = status.error.code.value if status.error else ""
        self.finished.labels(status.state.value, code).inc()
        if status.duplicate_of:
            return  # nothing ran
        if status.started_at and status.finished_at:
            seconds = (status.finished_at - status.started_at).total_seconds()
            self.job_seconds.labels(status.state.value).observe(seconds)
        for stage in (status.report or {}).get("stages", []):
            if stage.get("seconds") is not None:
                self.stage_seconds.labels(stage["name"]).observe(stage["seconds"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
