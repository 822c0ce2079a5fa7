"""The tenant's webhook signing secret, and the deliveries of a job's webhook (app/core/webhooks.py)."""

from fastapi import APIRouter
from sqlalchemy import select

from app.api.deps import CurrentTenant, JobDep, SessionsDep, SettingsDep
from app.api.routes.jobs import PROBLEM
from app.api.schemas import RotatedWebhookSecret, WebhookDeliveryList, WebhookDeliveryView, WebhookSecret
from app.core.models import Tenant, WebhookDelivery
from app.core.security import rotate_webhook_secret

router = APIRouter(tags=["webhooks"])


@router.get("/webhook-secret", summary="The secret that signs your webhooks (Standard Webhooks)",
            responses={401: PROBLEM})
def webhook_secret(tenant: CurrentTenant, sessions: SessionsDep) -> WebhookSecret:
    with sessions() as session:  # not the tenant the key cache holds: it may predate a rotation
        return WebhookSecret(secret=session.get(Tenant, tenant.id).webhook_secret)


@router.post("/webhook-secret/rotate", summary="Issue a new webhook secret; the old one keeps signing "
             "for a grace period", responses={401: PROBLEM})
def rotate_secret(tenant: CurrentTenant, sessions: SessionsDep, settings: SettingsDep) -> RotatedWebhookSecret:
    with sessions() as session:
        rotated = rotate_webhook_secret(session, tenant.id, settings.webhook_secret_grace_s)
    return RotatedWebhookSecret(secret=rotated.webhook_secret,
                                previous_secret_retires_at=rotated.previous_secret_retires_at)


@router.get("/jobs/{job_id}/webhooks", summary="The deliveries of a job's webhook, and their attempts",
            responses={401: PROBLEM, 404: PROBLEM})
def list_deliveries(job: JobDep, sessions: SessionsDep) -> WebhookDeliveryList:
    with sessions() as session:
        deliveries = list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job.id)
                                          .order_by(WebhookDelivery.created_at, WebhookDelivery.id)))
    return WebhookDeliveryList(deliveries=[WebhookDeliveryView.model_validate(d) for d in deliveries])
