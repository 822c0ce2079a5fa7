"""The tenant's webhook signing secret, and the deliveries of a job's webhook (app/core/webhooks.py)."""

from fastapi import APIRouter
from sqlalchemy import select

from app.api.deps import CurrentTenant, JobDep, SessionsDep
from app.api.routes.jobs import PROBLEM
from app.core.models import WebhookDelivery
from app.api.schemas import WebhookDeliveryList, WebhookDeliveryView, WebhookSecret

router = APIRouter(tags=["webhooks"])


@router.get("/webhook-secret", summary="The secret that signs your webhooks (Standard Webhooks)",
            responses={401: PROBLEM})
def webhook_secret(tenant: CurrentTenant) -> WebhookSecret:
    return WebhookSecret(secret=tenant.webhook_secret)


@router.get("/jobs/{job_id}/webhooks", summary="The deliveries of a job's webhook, and their attempts",
            responses={401: PROBLEM, 404: PROBLEM})
def list_deliveries(job: JobDep, sessions: SessionsDep) -> WebhookDeliveryList:
    with sessions() as session:
        deliveries = list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job.id)
                                          .order_by(WebhookDelivery.created_at, WebhookDelivery.id)))
    return WebhookDeliveryList(deliveries=[WebhookDeliveryView.model_validate(d) for d in deliveries])
