"""The API's response bodies other than a job's own view (app/core/job_views.py)."""

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.job_views import JobView, job_path
from app.core.models import DeliveryStatus, TriggerImage
from app.core.webhook_urls import without_credentials


class JobPage(BaseModel):
    jobs: list[JobView]
    next_page_token: str | None = Field(description="pass as page_token for the next page")


class TriggerView(BaseModel):
    class_: int = Field(serialization_alias="class", description="the class the trigger flips inputs to")
    family: str = Field(description="patch | mask")
    score: float | None = Field(description="the class's detection score: how much smaller its "
                                            "trigger is than the median class's, in log units, less "
                                            "what a reference model shares (higher: more suspicious)")
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


def trigger_views(job_id: uuid.UUID, images: list[TriggerImage]) -> list[TriggerView]:
    """One entry per recovered trigger (class and family), with the URLs of its pictures."""
    views: dict[tuple[int, str], TriggerView] = {}
    for image in images:
        view = views.setdefault((image.class_index, image.family), TriggerView(
            class_=image.class_index, family=image.family, score=image.score, images={}))
        view.images[image.kind] = f"{job_path(job_id)}/triggers/{image.name}.png"
    return list(views.values())
