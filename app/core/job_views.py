"""A job as the API, the web page and the webhooks show it: ``job_view`` turns a jobs row (with
its artifacts) into a ``JobView``; ``job_report`` reads its stored report
(worker/sanitize/report.py), from which the result and ``trigger_views`` come."""

import uuid
from datetime import datetime

from pydantic import BaseModel, Field

from app.core.mlflow_models import Registration
from app.core.models import ArtifactRole, Job, JobStatus
from worker.sanitize.report import AccuracyChange, Report


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
    clean_accuracy: AccuracyChange = Field(
        description="held-out accuracy before/after, the number of images, and the margin of the "
                    "change (half-width of its 95% interval; null in reports of older versions)")
    class_accuracy: list[dict[str, int | float | None]] = Field(
        description="the same for each class's held-out images: class, before, after, images, margin "
                    "(empty in reports of older versions)")
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
    model_source: str | None = Field(None, description="where the model was fetched from (model_url), "
                                     "without credentials or query string; null for an upload")
    registration: Registration | None = Field(None, description="for a model from MLflow (models:/, "
                                              "runs:/), once succeeded: where the sanitized model was "
                                              "registered, or why it was not")
    inputs: dict[str, InputFile]
    config: dict
    webhook_url: str | None
    links: JobLinks


class TriggerView(BaseModel):
    class_: int = Field(serialization_alias="class", description="the class the trigger flips inputs to")
    family: str = Field(description="patch | mask")
    score: float | None = Field(description="the class's detection score: how much smaller its "
                                            "trigger is than the median class's, in log units, less "
                                            "what a reference model shares (higher: more suspicious)")
    images: dict[str, str] = Field(description="picture kind (mask, pattern, stamped) -> PNG URL")


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
        result=job_result(job_report(job)) if job.status == JobStatus.succeeded else None,
        model_format=job.model_format, model_source=job.model_source,
        registration=Registration.model_validate(job.model_registration) if job.model_registration else None,
        inputs=inputs, config=job.config, webhook_url=job.webhook_url,
        links=JobLinks(self=path, cancel=f"{path}/cancel", model=f"{path}/model",
                       triggers=f"{path}/triggers", report=f"{path}/report", webhooks=f"{path}/webhooks"),
    )


def job_report(job: Job) -> Report:
    """A succeeded job's report, as whichever version stored it (reads the deferred column)."""
    return Report.from_stored(job.report)


def job_result(report: Report) -> JobResult:
    """The headline numbers of a succeeded job."""
    return JobResult(
        verdict=report.verdict, verdict_reason=report.verdict_reason,
        backdoor_probability=report.backdoor_probability, backdoor_detected=report.backdoor_detected,
        detected_targets=report.detected_targets, residual_targets=report.residual_targets,
        clean_accuracy=report.clean_accuracy.model_dump(),
        class_accuracy=[change.model_dump(by_alias=True) for change in report.class_accuracy],
        recovered_asr={target: asr.model_dump() for target, asr in report.recovered_asr.items()},
        timings=report.timings_s,
    )


def trigger_views(job_id: uuid.UUID, report: Report) -> list[TriggerView]:
    """One entry per recovered trigger (class and family), with the URLs of its pictures."""
    views: dict[tuple[int, str], TriggerView] = {}
    for trigger in sorted(report.triggers, key=lambda t: (t.class_, t.family, t.kind)):
        view = views.setdefault((trigger.class_, trigger.family), TriggerView(
            class_=trigger.class_, family=trigger.family, score=report.score_of(trigger.class_, trigger.family),
            images={}))
        view.images[trigger.kind] = f"{job_path(job_id)}/triggers/{trigger.name}.png"
    return list(views.values())
