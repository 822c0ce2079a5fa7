"""What the API returns. ``job_view`` is shared with the worker, which posts it to webhooks."""

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.models import ArtifactRole, DeliveryStatus, Job, JobStatus, TriggerImage
from app.webhook_urls import without_credentials


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


class JobPage(BaseModel):
    jobs: list[JobView]
    next_page_token: str | None = Field(description="pass as page_token for the next page")


class TriggerView(BaseModel):
    class_: int = Field(serialization_alias="class", description="the class the trigger flips inputs to")
    family: str = Field(description="patch | mask")
    score: float | None = Field(description="log ratio of the class: how much smaller its trigger "
                                            "is than the median class's (higher: more suspicious)")
    images: dict[str, str] = Field(description="picture kind (mask, pattern, stamped) -> PNG URL")


class TriggerList(BaseModel):
    triggers: list[TriggerView]


class WebhookSecret(BaseModel):
    secret: str = Field(description="whsec_<base64>: verify webhook-signature with the base64-decoded "
                                    "bytes as the HMAC-SHA256 key (Standard Webhooks)")


class WebhookDeliveryView(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    message_id: str = Field(description="the webhook-id header; the same on every attempt")
    event_type: str = Field(description="job.succeeded | job.failed | job.cancelled")
    url: str
    status: DeliveryStatus = Field(description="pending (more attempts to come) | delivered | failed")
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None = Field(description="the receiver's last HTTP status, if it answered")
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None

    @field_validator("url")
    @classmethod
    def hide_credentials(cls, url: str) -> str:
        # Submits refuse them now; rows from before may still have them.
        return without_credentials(url)


class WebhookDeliveryList(BaseModel):
    deliveries: list[WebhookDeliveryView]


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


def job_result(job: Job) -> JobResult:
    """The headline numbers, from the job's metric rows (see worker/jobs.py)."""
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


def trigger_views(job_id: uuid.UUID, images: list[TriggerImage]) -> list[TriggerView]:
    """One entry per recovered trigger (class and family), with the URLs of its pictures."""
    views: dict[tuple[int, str], TriggerView] = {}
    for image in images:
        view = views.setdefault((image.class_index, image.family), TriggerView(
            class_=image.class_index, family=image.family, score=image.score, images={}))
        view.images[image.kind] = f"{job_path(job_id)}/triggers/{image.name}.png"
    return list(views.values())
