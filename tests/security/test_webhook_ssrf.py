"""Webhooks reach only public addresses: internal ones are refused when the job is submitted
(after DNS resolution, whatever the spelling) and again when a worker delivers (against the
address it then connects to), unless the operator allows them; no redirects; credentials in a
URL are refused, and never logged or shown."""

import logging
import threading
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from sqlalchemy import select

from app.core.models import Job, WebhookDelivery
from app.core.webhooks import deliver_due
from tests.security.refusals import assert_problem, nothing_stored  # noqa: F401  (a fixture)

INTERNAL = [
    "http://127.0.0.1:6379/",              # loopback
    "http://localhost/hooks",              # a name that resolves to loopback
    "http://2130706433/",                  # 127.0.0.1 in decimal
    "http://0x7f000001/",                  # ... in hex
    "http://017700000001/",                # ... in octal
    "http://127.1/",                       # ... shortened
    "http://[::1]/",                       # IPv6 loopback
    "http://[::ffff:127.0.0.1]/",          # IPv4-mapped IPv6
    "http://169.254.169.254/latest/meta-data/",  # link-local: the cloud metadata service
    "http://[fe80::1]/",                   # IPv6 link-local
    "http://10.0.0.1/", "http://172.16.0.1/", "http://192.168.1.1/",  # private
    "http://100.64.0.1/",                  # shared address space (carrier NAT)
    "http://[fc00::1]/",                   # IPv6 unique local
    "http://224.0.0.1/", "http://[ff02::1]/",  # multicast
    "http://240.0.0.1/",                   # reserved
    "http://0.0.0.0/", "http://[::]/",     # unspecified
]


@pytest.mark.usefixtures("nothing_stored")
@pytest.mark.parametrize("url", INTERNAL)
def test_internal_addresses_are_refused_at_submit(submit, url):
    body = assert_problem(submit(config={"webhook_url": url}), 422, "config.webhook_url", "not a public address")
    assert body["errors"][0]["loc"] == "config.webhook_url"


@pytest.mark.usefixtures("nothing_stored")
def test_credentials_in_the_url_are_refused(submit, caplog):
    caplog.set_level(logging.DEBUG)
    response = submit(config={"webhook_url": "https://user:s3cret@93.184.215.14/hooks"})
    assert_problem(response, 422, "credentials")
    assert "s3cret" not in response.text and "s3cret" not in caplog.text


@pytest.mark.usefixtures("nothing_stored")
def test_a_host_that_does_not_resolve_is_refused(submit):
    assert_problem(submit(config={"webhook_url": "http://no-such-host.invalid/hooks"}), 422, "does not resolve")


def test_a_public_address_is_accepted(submit):
    # Accepting needs no connection: nothing is sent before the job ends.
    assert submit(config={"webhook_url": "https://93.184.215.14/hooks"}).status_code == 202


class Receiver:
    """A local HTTP server that counts the requests it gets and answers each with ``status``
    (and ``location``, for a redirect)."""

    def __init__(self, status: int = 204, location: str | None = None):
        self.hits = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                receiver.hits += 1
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made = []
    yield lambda **kw: made.append(Receiver(**kw)) or made[-1]
    for receiver in made:
        receiver.close()


def cancelled_with_webhook(client, submit, auth, url: str) -> dict:
    job = submit(config={"webhook_url": url}).json()
    assert client.post(job["links"]["cancel"], headers=auth).status_code == 202  # records the message
    return job


def test_delivery_checks_the_address_again(app, client, submit, auth, sessions, settings, receivers):
    """As after a DNS change: the URL was allowed at submit, not any more at delivery."""
    receiver = receivers()
    allowed = settings.model_copy(update={"webhook_allowed_hosts": ["127.0.0.1"]})
    app.state.settings = allowed  # the operator allowed it when the job was submitted
    job = cancelled_with_webhook(client, submit, auth, receiver.url)
    assert deliver_due(sessions, settings) == 1  # a worker without the allowance
    [delivery] = client.get(job["links"]["webhooks"], headers=auth).json()["deliveries"]
    assert receiver.hits == 0
    assert delivery["last_status_code"] is None and delivery["last_error"].startswith("refused:")
    assert "not a public address" in delivery["last_error"]


def test_the_operator_allow_list_lets_internal_hosts_through(app, client, submit, auth, sessions, settings,
                                                             receivers):
    receiver = receivers()
    allowed = settings.model_copy(update={"webhook_allowed_hosts": ["127.0.0.0/8"]})
    app.state.settings = allowed
    job = cancelled_with_webhook(client, submit, auth, receiver.url)
    assert deliver_due(sessions, allowed) == 1
    [delivery] = client.get(job["links"]["webhooks"], headers=auth).json()["deliveries"]
    assert receiver.hits == 1 and delivery["status"] == "delivered"


def test_redirects_are_not_followed(app, client, submit, auth, sessions, settings, receivers):
    internal = receivers()
    redirecting = receivers(status=307, location=internal.url)
    allowed = settings.model_copy(update={"webhook_allowed_hosts": ["127.0.0.1"]})
    app.state.settings = allowed
    job = cancelled_with_webhook(client, submit, auth, redirecting.url)
    assert deliver_due(sessions, allowed) == 1
    [delivery] = client.get(job["links"]["webhooks"], headers=auth).json()["deliveries"]
    assert redirecting.hits == 1 and internal.hits == 0
    assert delivery["status"] == "pending" and delivery["last_status_code"] == 307


def test_credentials_from_older_rows_are_never_shown_or_logged(client, submit, auth, sessions, settings, caplog):
    """A URL with credentials stored before they were refused: hidden in the delivery log and
    in the worker's log lines, and not called."""
    job = submit().json()
    job_id = uuid.UUID(job["id"])
    with sessions() as session:
        session.get(Job, job_id).webhook_url = "http://user:s3cret@127.0.0.1:9/hooks"
        session.commit()
    client.post(job["links"]["cancel"], headers=auth)  # records the message, with the URL as stored
    with sessions() as session:
        assert session.scalar(select(WebhookDelivery.url)).startswith("http://user:s3cret@")
    caplog.set_level(logging.DEBUG)
    deliver_due(sessions, settings.model_copy(update={"webhook_max_attempts": 1}))
    response = client.get(job["links"]["webhooks"], headers=auth)
    [delivery] = response.json()["deliveries"]
    assert delivery["url"] == "http://127.0.0.1:9/hooks" and "credentials" in delivery["last_error"]
    assert "s3cret" not in response.text and "s3cret" not in caplog.text
