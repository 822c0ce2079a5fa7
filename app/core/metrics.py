"""`GET /metrics` in the Prometheus text format, and the workers' metrics server.

Every job number comes from the database when Prometheus scrapes, by a custom collector, not
from counters in process memory: jobs are finished by worker processes (often Celery pool
processes that exit after each job) on other hosts, and the API may run as several replicas, so
in-memory counters would be split across processes and reset by every restart. The database's
answer is the same from any replica and survives all of them.

A scrape does a bounded amount of work however many jobs have run: it counts the queued and
running jobs (at most the tenants' active-job limits) and reads running totals, changed in the
transaction of what they count: ``MetricCounter`` rows (finished jobs by status, uploads) by
``add_to_counter``, and the duration histograms' ``DurationBucket`` rows by ``observe`` (a
finished job's run time, its report's stage timings; app/core/lifecycle.py).
"""

import logging
import os

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.core.models import ArtifactRole, DurationBucket, Job, JobStatus, MetricCounter

log = logging.getLogger(__name__)

# Jobs take seconds (a tiny model on a GPU) to hours (a ResNet on the CPU).
JOB_BUCKETS_S = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, float("inf"))
STAGE_BUCKETS_S = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
# The bounds of each histogram that DurationBucket rows count in. Changing them would misfile the
# counts already stored: add a histogram name instead.
BUCKETS_S = {"job": JOB_BUCKETS_S, "stage": STAGE_BUCKETS_S}


def upsert(session: Session, table, values: dict, keys: list[str], added: dict):
    """INSERT values, or where a row with the same keys exists, add ``added`` to it."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    insert = dialect.insert(table).values(**values)
    return session.execute(insert.on_conflict_do_update(index_elements=keys, set_=added))


def add_to_counter(session: Session, name: str, label: str, amount: int) -> None:
    """Adds ``amount`` to a running total; committed with the caller's transaction."""
    upsert(session, MetricCounter, {"name": name, "label": label, "value": amount}, ["name", "label"],
           {"value": MetricCounter.value + amount})


def observe(session: Session, histogram: str, label: str, seconds: float) -> None:
    """Counts one duration in its bucket; committed with the caller's transaction. An upsert, so
    that workers finishing jobs at once each add theirs."""
    seconds = max(seconds, 0.0)
    bucket = next(i for i, bound in enumerate(BUCKETS_S[histogram]) if seconds <= bound)
    upsert(session, DurationBucket, {"histogram": histogram, "label": label, "bucket": bucket, "count": 1,
                                     "total_s": seconds}, ["histogram", "label", "bucket"],
           {"count": DurationBucket.count + 1, "total_s": DurationBucket.total_s + seconds})


def histogram(name: str, documentation: str, buckets, rows: list[DurationBucket],
              label_name: str) -> HistogramMetricFamily:
    """A histogram family from the DurationBucket rows of one histogram."""
    family = HistogramMetricFamily(name, documentation, labels=[label_name])
    for label in sorted({row.label for row in rows}):
        counts = [0] * len(buckets)
        total = 0.0
        for row in rows:
            if row.label == label and row.bucket < len(buckets):
                counts[row.bucket] += row.count
                total += row.total_s
        cumulative = [(str(bound) if bound != float("inf") else "+Inf", sum(counts[:i + 1]))
                      for i, bound in enumerate(buckets)]
        family.add_metric([label], cumulative, total)
    return family


class DatabaseCollector:
    """Jobs by status, queue depth, upload bytes and duration histograms, read at scrape time."""

    def __init__(self, sessions):
        self.sessions = sessions

    def collect(self):
        up = GaugeMetricFamily("baerase_database_up", "1 when the metrics could be read from the database")
        try:
            families = self.read()
        except SQLAlchemyError as e:
            log.warning("metrics: cannot read the database (%s)", type(e).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def read(self) -> list:
        with self.sessions() as session:
            active = dict(session.execute(
                select(Job.status, func.count()).where(Job.status.in_([JobStatus.queued, JobStatus.running]))
                .group_by(Job.status)).all())
            counters = {(row.name, row.label): row.value for row in session.scalars(select(MetricCounter))}
            buckets = list(session.scalars(select(DurationBucket)))
        by_status = {status: active.get(status, 0) if status in (JobStatus.queued, JobStatus.running)
                     else counters.get(("finished_jobs", status.value), 0) for status in JobStatus}

        jobs = GaugeMetricFamily("baerase_jobs", "Jobs in the database by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], by_status[status])
        queue = GaugeMetricFamily("baerase_queue_depth", "Jobs waiting for a worker (status queued)")
        queue.add_metric([], by_status[JobStatus.queued])
        upload = CounterMetricFamily("baerase_upload_bytes", "Bytes uploaded, by part (model or samples)",
                                     labels=["part"])
        upload_count = CounterMetricFamily("baerase_uploads", "Files uploaded, by part", labels=["part"])
        for role in (ArtifactRole.model, ArtifactRole.samples):
            upload.add_metric([role.value], counters.get(("upload_bytes", role.value), 0))
            upload_count.add_metric([role.value], counters.get(("uploads", role.value), 0))

        return [jobs, queue, upload, upload_count,
                histogram("baerase_job_duration_seconds", "Run time of finished jobs (start to end)",
                          JOB_BUCKETS_S, [row for row in buckets if row.histogram == "job"], "status"),
                histogram("baerase_stage_duration_seconds", "Time per engine stage of succeeded jobs "
                          "(the report's timings_s)", STAGE_BUCKETS_S,
                          [row for row in buckets if row.histogram == "stage"], "stage")]


def make_registry(sessions, version: str) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(sessions))
    info = InfoMetricFamily("baerase_build", "The service's version")
    info.add_metric([], {"version": version})
    registry.register(type("BuildInfo", (), {"collect": lambda self: iter([info])})())
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST


def start_worker_metrics(port: int, devices: list[str]) -> None:
    """The worker's own metrics (process CPU, memory, open files; its devices) on this port."""
    from prometheus_client import REGISTRY, Gauge

    Gauge("baerase_worker_devices", "Devices this worker runs jobs on (one job at a time on each)"
          ).set(len(devices))
    Gauge("baerase_worker_info", "This worker", ["devices", "pid"]).labels(
        ",".join(d or "cpu" for d in devices), str(os.getpid())).set(1)
    start_http_server(port, registry=REGISTRY)
