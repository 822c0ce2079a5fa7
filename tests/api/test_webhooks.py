"""Webhooks on both databases: the tenant's secret, Standard Webhooks signatures, and deliveries
retried with exponential backoff and recorded."""

import base64
import hashlib
import hmac
import json
import socket
from datetime import datetime, timedelta

import pytest

from app.core.models import utcnow
from app.core.webhooks import deliver_due, sign
from tests.api.support import wait_for


@pytest.fixture
def settings(settings):
    # The receivers here listen on 127.0.0.1, which webhooks reach only where the operator allows it.
    return settings.model_copy(update={"webhook_allowed_hosts": ["127.0.0.1"]})


def test_each_tenant_has_its_own_webhook_secret(client, auth, other_auth):
    secret = client.get("/webhook-secret", headers=auth).json()["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert client.get("/webhook-secret", headers=auth).json()["secret"] == secret
    assert client.get("/webhook-secret", headers=other_auth).json()["secret"] != secret
    response = client.get("/webhook-secret")
    assert response.status_code == 401 and response.headers["content-type"] == "application/problem+json"


def test_signatures_match_the_standard_webhooks_test_vector():
    # The example of the Standard Webhooks specification and of its reference libraries.
    assert sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                '{"test": 2432232314}') == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def verified(request, secret: str) -> bool:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{request.headers['webhook-id']}.{request.headers['webhook-timestamp']}.".encode() + request.body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return expected in request.headers["webhook-signature"].split(" ")


def test_a_failed_delivery_is_retried_with_backoff_and_recorded(client, submit, auth, sessions, settings,
                                                                webhook_receiver):
    base = 0.2
    settings = settings.model_copy(update={"webhook_retry_base_s": base})
    job = submit(config={"webhook_url": webhook_receiver.url}).json()
    # Cancelling a queued job finishes it in the API process, which only records the message.
    assert client.post(job["links"]["cancel"], headers=auth).json()["status"] == "cancelled"
    [delivery] = client.get(job["links"]["webhooks"], headers=auth).json()["deliveries"]
    assert delivery["status"] == "pending" and delivery["attempts"] == 0 and not webhook_receiver.requests

    webhook_receiver.statuses = [500, 503]
    for failures, wait in ((1, base), (2, 2 * base)):
        before = utcnow()
        wait_for(lambda: deliver_due(sessions, settings), "the delivery to be due")
        [delivery] = client.get(job["links"]["webhooks"], headers=auth).json()["deliveries"]
        assert delivery["status"] == "pending" and delivery["attempts"] == failures
        assert delivery["last_error"] == f"the receiver answered {(500, 503)[failures - 1]}"
        retry_at = datetime.fromisoformat(delivery["next_attempt_at"])
        assert retry_at >= before + timedelta(seconds=wait)  # the backoff doubles

    wait_for(lambda: deliver_due(sessions, settings), "the delivery to be due")
    [delivery] = client.get(job["links"]["webhooks"], headers=auth).json()["deliveries"]
    assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("delivered", 3, 204)
    assert delivery["delivered_at"] and delivery["next_attempt_at"] is None

    secret = client.get("/webhook-secret", headers=auth).json()["secret"]
    requests = webhook_receiver.requests
    assert len(requests) == 3 and all(verified(r, secret) for r in requests)
    assert {r.headers["webhook-id"] for r in requests} == {delivery["message_id"]}
    assert {r.body for r in requests} == {requests[0].body}  # the same message every time
    event = json.loads(requests[0].body)
    assert event["type"] == "job.cancelled" and event["data"]["id"] == job["id"]


def test_a_delivery_gives_up_after_its_last_attempt(client, submit, auth, sessions, settings):
    settings = settings.model_copy(update={"webhook_retry_base_s": 0.1, "webhook_max_attempts": 2})
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/hooks"
        job = submit(config={"webhook_url": url}).json()
        client.post(job["links"]["cancel"], headers=auth)

        def settled():
            deliver_due(sessions, settings)
            [delivery] = client.get(job["links"]["webhooks"], headers=auth).json()["deliveries"]
            return delivery if delivery["status"] != "pending" else None

        delivery = wait_for(settled, "the delivery to be settled")
    assert delivery["status"] == "failed" and delivery["attempts"] == 2 and delivery["next_attempt_at"] is None
    assert delivery["last_status_code"] is None and "ConnectError" in delivery["last_error"]
