"""The API's response bodies other than a job's own view (app/core/job_views.py)."""

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.job_views import JobView, TriggerView
from app.core.models import DeliveryStatus
from app.core.webhook_urls import without_credentials


class JobPage(BaseModel):
    jobs: list[JobView]
    next_page_token: str | None = Field(description="pass as page_token for the next page")


class TriggerList(BaseModel):
    triggers: list[TriggerView]


class WebhookSecret(BaseModel):
    secret: str = Field(description="whsec_<base64>: verify webhook-signature with the base64-decoded "
                                    "bytes as the HMAC-SHA256 key (Standard Webhooks)")


class RotatedWebhookSecret(BaseModel):
    secret: str = Field(description="the new secret, whsec_<base64>; it signs every webhook from now on")
    previous_secret_retires_at: datetime = Field(
        description="until then webhooks carry a second signature, by the previous secret "
                    "(BAERASE_WEBHOOK_SECRET_GRACE_S after the rotation)")


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

