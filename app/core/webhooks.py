"""Webhooks as the Standard Webhooks spec has them (https://www.standardwebhooks.com/).

When a job reaches a final state and has a ``webhook_url``, ``queue_webhook`` adds a message to
``webhook_deliveries`` in the same transaction as the state change (an outbox: the message cannot
be lost, nor sent for a state that was rolled back). Workers deliver it: at once, from the process
that finished the job, and again from the sweeper with exponential backoff until the receiver
answers 2xx or ``webhook_max_attempts`` is reached. Every attempt is recorded on the row.

The body is ``{"type": "job.succeeded", "timestamp": ..., "data": <the job, as GET /jobs/{id}>}``,
sent with the headers ``webhook-id`` (the same on every attempt, for deduplication),
``webhook-timestamp`` (Unix seconds of the attempt) and ``webhook-signature``:
``v1,<base64 HMAC-SHA256 over "<id>.<timestamp>.<body>">``, keyed with the raw bytes of the
tenant's secret ``whsec_<base64>`` (GET /webhook-secret). After a rotation (POST
/webhook-secret/rotate) the header carries two signatures, space-separated as the spec allows,
until the previous secret retires (webhook_secret_grace_s): a receiver that still has the old
secret verifies the message, and so does one that has the new.
"""

import base64
import hashlib
import hmac
import json
import logging
import uuid
from datetime import timedelta

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import Sessions
from app.core.security import WEBHOOK_SECRET_PREFIX, signing_secrets
from app.core.models import DeliveryStatus, Job, Tenant, WebhookDelivery, utcnow
from app.core.job_views import job_view
from app.core.webhook_urls import UnsafeUrl, check_webhook_url, send_checked, without_credentials

log = logging.getLogger(__name__)

# How long one delivery attempt may hold its claim on a message before another worker may try
# it again (the attempt itself gives up after webhook_timeout_s).
CLAIM_MARGIN_S = 60
# Deliveries a sweep attempts at most: receivers that do not answer (webhook_timeout_s each)
# must not hold up the sweeper's other duties for long.
BATCH = 20


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    """The webhook-signature header value for one attempt."""
    key = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX))
    digest = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return f"v1,{base64.b64encode(digest).decode()}"


def queue_webhook(session: Session, job_id: uuid.UUID) -> None:
    """Adds the message about the job's final state, if it has a webhook_url; the caller has
    written (flushed) that state and commits the message together with it."""
    job = session.get(Job, job_id, populate_existing=True)
    if not job.webhook_url:
        return
    data = job_view(job).model_dump(mode="json")
    event = {"type": f"job.{job.status.value}", "timestamp": data["finished_at"], "data": data}
    session.add(WebhookDelivery(job_id=job.id, message_id=f"msg_{uuid.uuid4().hex}",
                                event_type=event["type"], url=job.webhook_url,
                                payload=json.dumps(event, separators=(",", ":"))))


def deliver_due(sessions: Sessions, settings: Settings, job_id: uuid.UUID | None = None) -> int:
    """Attempts the pending deliveries that are due (only the job's, if given); returns how many
    were attempted. Several workers may call this at once: each attempt claims its row first."""
    query = (select(WebhookDelivery.id).where(WebhookDelivery.status == DeliveryStatus.pending,
                                              WebhookDelivery.next_attempt_at <= utcnow())
             .order_by(WebhookDelivery.next_attempt_at).limit(BATCH))
    if job_id is not None:
        query = query.where(WebhookDelivery.job_id == job_id)
    with sessions() as session:
        due = list(session.scalars(query))
    return sum(attempt_delivery(sessions, settings, delivery_id) for delivery_id in due)


def attempt_delivery(sessions: Sessions, settings: Settings, delivery_id: int) -> bool:
    """Claims the delivery (pushing its next_attempt_at past this attempt), POSTs it and records
    the outcome; False if another worker claimed it first."""
    now = utcnow()
    with sessions() as session:
        claimed = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == DeliveryStatus.pending,
                   WebhookDelivery.next_attempt_at <= now)
            .values(next_attempt_at=now + timedelta(seconds=settings.webhook_timeout_s + CLAIM_MARGIN_S)))
        session.commit()
        if claimed.rowcount != 1:
            return False
        delivery, tenant = session.execute(
            select(WebhookDelivery, Tenant).join(Job, Job.id == WebhookDelivery.job_id)
            .join(Tenant, Tenant.id == Job.tenant_id).where(WebhookDelivery.id == delivery_id)).one()

    status_code, error = post(delivery, signing_secrets(tenant, utcnow()), settings)
    attempts = delivery.attempts + 1
    outcome = {"attempts": attempts, "last_status_code": status_code, "last_error": error}
    if error is None:
        outcome |= {"status": DeliveryStatus.delivered, "delivered_at": utcnow(), "next_attempt_at": None}
    elif attempts >= settings.webhook_max_attempts:
        outcome |= {"status": DeliveryStatus.failed, "next_attempt_at": None}
        log.warning("webhook %s to %s failed %d times; giving up (%s)", delivery.message_id,
                    without_credentials(delivery.url), attempts, error)
    else:
        backoff = settings.webhook_retry_base_s * 2 ** (attempts - 1)
        outcome["next_attempt_at"] = utcnow() + timedelta(seconds=backoff)
        log.info("webhook %s to %s failed (%s); next attempt in %.0f s", delivery.message_id,
                 without_credentials(delivery.url), error, backoff)
    with sessions() as session:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(**outcome))
        session.commit()
    return True


def post(delivery: WebhookDelivery, secrets: list[str], settings: Settings) -> tuple[int | None, str | None]:
    """One attempt: (HTTP status, None) on a 2xx answer, else (status or None, what went wrong).
    Redirects count as failures, as the spec advises (and a redirect could point anywhere)."""
    try:
        target = check_webhook_url(delivery.url, settings.webhook_allowed_hosts)
    except UnsafeUrl as e:
        return None, f"refused: {e}"[:500]
    timestamp = int(utcnow().timestamp())
    headers = {"content-type": "application/json", "user-agent": "baerase-webhook",
               "webhook-id": delivery.message_id, "webhook-timestamp": str(timestamp),
               "webhook-signature": " ".join(sign(secret, delivery.message_id, timestamp, delivery.payload)
                                             for secret in secrets)}
    with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False) as client:
        try:
            response = send_checked(client, target, "POST", headers=headers, content=delivery.payload.encode())
        except httpx.HTTPError as e:
            return None, f"{type(e).__name__}: {e}"[:500]
    if response.is_success:
        return response.status_code, None
    return response.status_code, f"the receiver answered {response.status_code}"
