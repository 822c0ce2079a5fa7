"""A job as the API shows it and its webhooks carry it: ``job_view`` turns a jobs row (with its
artifacts and metric rows) into a ``JobView``; ``report_metrics`` names the report's numbers for
those metric rows."""

import uuid
from datetime import datetime

from pydantic import BaseModel, Field

from app.core.models import ArtifactRole, Job, JobStatus

# Report sections whose numbers are kept as job_metrics rows, named by their dotted path.
METRIC_SECTIONS = ("clean_accuracy", "recovered_asr", "timings_s", "sample_accuracy", "backdoor_probability")

class Progress(BaseModel):
    stage: str | None = Field(description="validate | recovery | unlearning | report")
    fraction: float = Field(description="overall progress in [0, 1]")
    message: str | None


class JobError(BaseModel):
    code: str = Field(description="invalid_input (the message says what to fix), time_limit, "
                                  "resource_limit, worker_lost or internal_error")
    message: str


class JobResult(BaseModel):
    verdict: str = Field(description="clean (untouched), suspicious (untouched; verdict_reason says "
                                     "why), removed (erased, and a new search finds no trigger) or "
                                     "residual (the backdoor may survive)")
    verdict_reason: str
    backdoor_probability: float = Field(description="calibrated chance that the model is not clean")
    backdoor_detected: bool
    detected_targets: list[int]
    residual_targets: list[int]
    clean_accuracy: dict[str, float] = Field(description="held-out accuracy before/after")
    recovered_asr: dict[str, dict[str, float]] = Field(
        description="per detected target: the recovered trigger's success rate before/after")
    timings: dict[str, float] = Field(description="seconds per stage")


class InputFile(BaseModel):
    filename: str
    size: int
    sha256: str


class JobLinks(BaseModel):
    self: str
    cancel: str
    model: str = Field(description="the sanitized model, once succeeded")
    triggers: str
    report: str
    webhooks: str = Field(description="the deliveries of its webhook")


class JobView(BaseModel):
    id: uuid.UUID
    status: JobStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    cancel_requested: bool
    attempts: int = Field(description="how many times a worker has started it (a job whose worker "
                                      "died is run again, up to a limit)")
    error: JobError | None
    result: JobResult | None
    model_format: str = Field(description="torchscript | state_dict | safetensors")
    inputs: dict[str, InputFile]
    config: dict
    webhook_url: str | None
    links: JobLinks


def job_path(job_id: uuid.UUID) -> str:
    return f"/jobs/{job_id}"


def job_view(job: Job) -> JobView:
    path = job_path(job.id)
    inputs = {role.value: InputFile(filename=a.filename, size=a.size, sha256=a.sha256)
              for role in (ArtifactRole.model, ArtifactRole.samples) if (a := job.artifact(role))}
    return JobView(
        id=job.id, status=job.status, created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at,
        progress=Progress(stage=job.progress_stage, fraction=job.progress_fraction,
                          message=job.progress_message),
        cancel_requested=job.cancel_requested, attempts=job.attempts,
        error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
        result=job_result(job) if job.status == JobStatus.succeeded else None,
        model_format=job.model_format, inputs=inputs, config=job.config, webhook_url=job.webhook_url,
        links=JobLinks(self=path, cancel=f"{path}/cancel", model=f"{path}/model",
                       triggers=f"{path}/triggers", report=f"{path}/report", webhooks=f"{path}/webhooks"),
    )


def report_metrics(report: dict) -> dict[str, float]:
    """The report's numbers by dotted path: clean_accuracy.after, recovered_asr.0.before, ...
    (stored as the job's metric rows, which ``job_result`` reads back)."""
    metrics = {}

    def walk(path: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{path}.{key}", item)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            metrics[path] = float(value)

    for section in METRIC_SECTIONS:
        walk(section, report.get(section))
    return metrics


def job_result(job: Job) -> JobResult:
    """The headline numbers, from the job's metric rows (``report_metrics``)."""
    metrics = {m.name: m.value for m in job.metrics}

    def under(prefix: str) -> dict[str, float]:
        return {name.removeprefix(prefix): value for name, value in metrics.items()
                if name.startswith(prefix)}

    targets = job.detected_targets or []
    report = job.report or {}
    return JobResult(
        verdict=report.get("verdict", "clean"), verdict_reason=report.get("verdict_reason", ""),
        backdoor_probability=report.get("backdoor_probability", 0.0),
        backdoor_detected=bool(job.backdoor_detected), detected_targets=targets,
        residual_targets=report.get("residual_targets", []),
        clean_accuracy=under("clean_accuracy."),
        recovered_asr={str(t): under(f"recovered_asr.{t}.") for t in targets},
        timings=under("timings_s."),
    )
