"""`GET /metrics` in the Prometheus text format, and the workers' metrics server.

Every job number is computed from the database when Prometheus scrapes, by a custom collector,
not counted in process memory: the jobs table is the source of truth (see app/core/models.py), jobs
are finished by worker processes (often Celery pool processes that exit after each job) on other
hosts, and the API may run as several replicas. In-memory counters would be split across
processes and reset by every restart; the database's answer is the same from any replica and
survives all of them. Histograms are rebuilt from the rows of finished jobs (finished_at -
started_at, and each report's timings_s.* numbers in job_metrics), so their buckets are exact.
Deleting a job removes it from these numbers, as it removes it from the database.
"""

import logging
import os

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from app.core.models import Artifact, ArtifactRole, Job, JobMetric, JobStatus

log = logging.getLogger(__name__)

# Jobs take seconds (a tiny model on a GPU) to hours (a ResNet on the CPU).
JOB_BUCKETS_S = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, float("inf"))
STAGE_BUCKETS_S = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
STAGE_PREFIX = "timings_s."


def histogram(name: str, documentation: str, buckets, samples: dict[tuple, list[float]],
              label_names: list[str]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=label_names)
    for labels, values in sorted(samples.items()):
        cumulative = [(str(bound) if bound != float("inf") else "+Inf", sum(v <= bound for v in values))
                      for bound in buckets]
        family.add_metric(list(labels), cumulative, sum(values))
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
            by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            upload_bytes = dict(session.execute(
                select(Artifact.role, func.coalesce(func.sum(Artifact.size), 0))
                .where(Artifact.role.in_([ArtifactRole.model, ArtifactRole.samples]))
                .group_by(Artifact.role)).all())
            uploads = dict(session.execute(
                select(Artifact.role, func.count())
                .where(Artifact.role.in_([ArtifactRole.model, ArtifactRole.samples]))
                .group_by(Artifact.role)).all())
            finished = session.execute(
                select(Job.status, Job.started_at, Job.finished_at)
                .where(Job.status.in_([JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled]),
                       Job.started_at.is_not(None), Job.finished_at.is_not(None))).all()
            stages = session.execute(select(JobMetric.name, JobMetric.value)
                                     .where(JobMetric.name.like(f"{STAGE_PREFIX}%"))).all()

        jobs = GaugeMetricFamily("baerase_jobs", "Jobs in the database by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], by_status.get(status, 0))
        queue = GaugeMetricFamily("baerase_queue_depth", "Jobs waiting for a worker (status queued)")
        queue.add_metric([], by_status.get(JobStatus.queued, 0))
        upload = CounterMetricFamily("baerase_upload_bytes", "Bytes uploaded, by part (model or samples)",
                                     labels=["part"])
        upload_count = CounterMetricFamily("baerase_uploads", "Files uploaded, by part", labels=["part"])
        for role in (ArtifactRole.model, ArtifactRole.samples):
            upload.add_metric([role.value], int(upload_bytes.get(role, 0)))
            upload_count.add_metric([role.value], uploads.get(role, 0))

        durations: dict[tuple, list[float]] = {}
        for status, started, ended in finished:
            durations.setdefault((status.value,), []).append(max((ended - started).total_seconds(), 0.0))
        stage_times: dict[tuple, list[float]] = {}
        for name, value in stages:
            stage = name[len(STAGE_PREFIX):]
            if stage != "total":
                stage_times.setdefault((stage,), []).append(value)
        return [jobs, queue, upload, upload_count,
                histogram("baerase_job_duration_seconds", "Run time of finished jobs (start to end)",
                          JOB_BUCKETS_S, durations, ["status"]),
                histogram("baerase_stage_duration_seconds", "Time per engine stage of succeeded jobs "
                          "(the report's timings_s)", STAGE_BUCKETS_S, stage_times, ["stage"])]


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
