"""Growth that stays bounded, on both databases: a /metrics scrape does the same work however
many jobs have run, finished jobs' files and old Idempotency-Keys expire (410 Gone for the
files), webhook secrets rotate with a grace period, and a job whose message never reached the
broker is picked at the next sweep."""

from datetime import timedelta
from uuid import UUID

import pytest
from sqlalchemy import event, select, update

from app.core.lifecycle import (claim, expire_finished_jobs, expire_idempotency_records, finish, mark_announced,
                                take_waiting_jobs)
from app.core.models import IdempotencyRecord, Job, JobStatus, Tenant, utcnow
from app.core.webhooks import deliver_due
from tests.api.support import assert_problem, wait_for
from tests.api.test_webhooks import verified


@pytest.fixture
def settings(settings):
    # The receivers here listen on 127.0.0.1, which webhooks reach only where the operator allows it.
    return settings.model_copy(update={"webhook_allowed_hosts": ["127.0.0.1"]})


def finished_jobs(submit, sessions, settings, count: int) -> None:
    for _ in range(count):
        job_claim = claim(sessions, UUID(submit().json()["id"]))
        finish(sessions, settings, job_claim, JobStatus.failed, "internal_error", "it broke")


class SqlCounter:
    """The statements an engine runs and the rows they return, while active."""

    def __init__(self, engine):
        self.statements = self.rows = 0
        event.listen(engine, "after_cursor_execute", self.count)

    def count(self, connection, cursor, statement, parameters, context, executemany):
        self.statements += 1
        self.rows += max(cursor.rowcount, 0) if statement.lstrip().upper().startswith("SELECT") else 0


def scrape_cost(client, app) -> tuple[int, int]:
    counter = SqlCounter(app.state.sessions.kw["bind"])
    try:
        text = client.get("/metrics").text
    finally:
        event.remove(app.state.sessions.kw["bind"], "after_cursor_execute", counter.count)
    assert 'baerase_jobs{status="failed"}' in text
    return counter.statements, counter.rows


def test_a_metrics_scrape_does_the_same_work_however_many_jobs_have_run(app, client, submit, sessions, settings):
    finished_jobs(submit, sessions, settings, 2)
    few = scrape_cost(client, app)
    finished_jobs(submit, sessions, settings, 20)
    many = scrape_cost(client, app)
    assert many == few
    assert 'baerase_jobs{status="failed"} 22.0' in client.get("/metrics").text


def test_finished_jobs_files_expire_and_answer_410(client, submit, auth, sessions, settings, app):
    job = submit().json()
    job_claim = claim(sessions, UUID(job["id"]))
    finish(sessions, settings, job_claim, JobStatus.failed, "internal_error", "it broke")
    assert expire_finished_jobs(sessions, app.state.store, settings) == []  # finished just now

    with sessions() as session:
        session.execute(update(Job).values(finished_at=utcnow() - timedelta(days=settings.artifact_retention_days + 1)))
        session.commit()
    assert expire_finished_jobs(sessions, app.state.store, settings) == [UUID(job["id"])]
    assert not (settings.artifact_dir / "jobs" / job["id"]).exists()
    assert expire_finished_jobs(sessions, app.state.store, settings) == []

    now = client.get(job["links"]["self"], headers=auth).json()
    assert now["status"] == "failed" and now["inputs"]["model"]["filename"] == "model.pt"  # the record stays
    with sessions() as session:  # a job that succeeded would answer the same; this one is marked expired
        session.execute(update(Job).values(status=JobStatus.succeeded, report={}))
        session.commit()
    for link in (job["links"]["model"], job["links"]["triggers"], f"{job['links']['triggers']}/class0_mask_mask.png"):
        assert_problem(client.get(link, headers=auth), 410, "deleted", "report")


def test_idempotency_keys_are_forgotten_after_their_retention(submit, auth, sessions, settings):
    first = submit(headers=auth | {"Idempotency-Key": "k1"}).json()
    assert submit(headers=auth | {"Idempotency-Key": "k1"}).json()["id"] == first["id"]
    assert expire_idempotency_records(sessions, settings) == 0
    with sessions() as session:
        session.execute(update(IdempotencyRecord).values(
            created_at=utcnow() - timedelta(hours=settings.idempotency_retention_hours + 1)))
        session.commit()
    assert expire_idempotency_records(sessions, settings) == 1
    assert submit(headers=auth | {"Idempotency-Key": "k1"}).json()["id"] != first["id"]


def test_a_rotated_webhook_secret_signs_alongside_the_old_one_until_it_retires(
        client, submit, auth, sessions, settings, webhook_receiver):
    old = client.get("/webhook-secret", headers=auth).json()["secret"]
    rotated = client.post("/webhook-secret/rotate", headers=auth).json()
    assert rotated["secret"] != old and client.get("/webhook-secret", headers=auth).json()["secret"] == rotated["secret"]

    def delivered_request():
        job = submit(config={"webhook_url": webhook_receiver.url}).json()
        client.post(job["links"]["cancel"], headers=auth)  # a final state, and its webhook
        wait_for(lambda: deliver_due(sessions, settings), "the delivery")
        return webhook_receiver.requests[-1]

    during = delivered_request()
    assert verified(during, old) and verified(during, rotated["secret"])

    with sessions() as session:  # the grace period is over
        session.execute(update(Tenant).values(previous_secret_retires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
    after = delivered_request()
    assert verified(after, rotated["secret"]) and not verified(after, old)


def test_a_job_whose_message_never_left_is_picked_at_the_next_sweep(submit, sessions, settings):
    # No broker here: the API announces nothing, as when the broker was down at submit.
    job_id = UUID(submit().json()["id"])
    assert take_waiting_jobs(sessions, settings) == []  # the API may still be sending it
    with sessions() as session:
        session.execute(update(Job).values(enqueued_at=utcnow() - timedelta(seconds=settings.sweep_interval_s + 1)))
        session.commit()
    assert settings.resend_queued_after_s > settings.sweep_interval_s + 1
    assert take_waiting_jobs(sessions, settings) == [job_id]  # not after resend_queued_after_s
    mark_announced(sessions, job_id)
    with sessions() as session:
        session.execute(update(Job).values(enqueued_at=utcnow() - timedelta(seconds=settings.sweep_interval_s + 1)))
        session.commit()
        assert session.scalar(select(Job.announced))
    assert take_waiting_jobs(sessions, settings) == []  # announced: only the long timer resends it
