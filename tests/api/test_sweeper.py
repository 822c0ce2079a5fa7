"""The sweeper and the job claim on both databases, without a broker: a job whose worker fell
silent is queued again, failed after its last attempt or cancelled; a queued job that has waited
long is picked for a new message; and the writes of a worker that lost its claim are dropped."""

from datetime import timedelta
from uuid import UUID

import pytest

from sqlalchemy import select, update

from app.core.lifecycle import claim, finish, recover_lost_jobs, take_waiting_jobs
from app.core.models import Job, JobStatus, WebhookDelivery, utcnow
from worker.runner import JobTracker


@pytest.fixture
def settings(settings):
    # The receivers here listen on 127.0.0.1, which webhooks reach only where the operator allows it.
    return settings.model_copy(update={"webhook_allowed_hosts": ["127.0.0.1"]})


def silence(sessions, job_id: UUID, seconds: float) -> None:
    """What a dead worker leaves behind: a heartbeat that stopped ``seconds`` ago."""
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))
        session.commit()


def row(sessions, job_id: UUID) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def test_a_job_whose_worker_fell_silent_is_queued_again_until_its_last_attempt(submit, sessions, settings):
    job_id = UUID(submit(config={"webhook_url": "http://127.0.0.1:9/hooks"}).json()["id"])
    stale = settings.heartbeat_timeout_s + 1
    for attempt in range(1, settings.job_max_attempts):
        assert claim(sessions, job_id).attempt == attempt
        assert recover_lost_jobs(sessions, settings) == []  # its heartbeat is fresh
        silence(sessions, job_id, stale)
        assert recover_lost_jobs(sessions, settings) == [job_id]
        job = row(sessions, job_id)
        assert (job.status, job.attempts, job.worker_id, job.heartbeat_at) == ("queued", attempt, None, None)
        assert job.progress_message == "requeued: its worker stopped responding"

    claim(sessions, job_id)
    silence(sessions, job_id, stale)
    assert recover_lost_jobs(sessions, settings) == []
    job = row(sessions, job_id)
    assert (job.status, job.attempts, job.error_code) == ("failed", settings.job_max_attempts, "worker_lost")
    assert f"each of its {settings.job_max_attempts} attempts" in job.error_message
    with sessions() as session:
        assert session.scalar(select(WebhookDelivery.event_type).where(WebhookDelivery.job_id == job_id)) == "job.failed"


def test_a_cancelled_job_whose_worker_fell_silent_ends_cancelled(client, submit, auth, sessions, settings):
    job = submit().json()
    claim(sessions, UUID(job["id"]))
    client.post(job["links"]["cancel"], headers=auth)
    silence(sessions, UUID(job["id"]), settings.heartbeat_timeout_s + 1)
    assert recover_lost_jobs(sessions, settings) == []
    assert client.get(job["links"]["self"], headers=auth).json()["status"] == "cancelled"


def test_a_worker_that_lost_its_claim_writes_nothing(submit, sessions, settings):
    job_id = UUID(submit().json()["id"])
    lost = claim(sessions, job_id)
    silence(sessions, job_id, settings.heartbeat_timeout_s + 1)
    recover_lost_jobs(sessions, settings)
    current = claim(sessions, job_id)
    assert (lost.attempt, current.attempt) == (1, 2)

    tracker = JobTracker(sessions, lost, settings.heartbeat_interval_s)
    assert not tracker.write(progress_message="from the past") and tracker.lost.is_set()
    assert finish(sessions, settings, lost, JobStatus.failed, "internal_error", "late") is None
    job = row(sessions, job_id)
    assert (job.status, job.attempts, job.worker_id) == ("running", 2, current.worker_id)
    assert job.progress_message == "starting" and job.error_code is None
    assert finish(sessions, settings, current, JobStatus.cancelled) == "cancelled"


def test_queued_jobs_that_waited_long_are_picked_for_a_new_message_once(submit, sessions, settings):
    waiting, fresh = (UUID(submit().json()["id"]) for _ in range(2))
    with sessions() as session:
        session.execute(update(Job).where(Job.id == waiting).values(
            enqueued_at=utcnow() - timedelta(seconds=settings.resend_queued_after_s + 1)))
        session.commit()
    assert take_waiting_jobs(sessions, settings) == [waiting]
    assert take_waiting_jobs(sessions, settings) == []  # stamped as sent just now
    assert row(sessions, fresh).status == "queued"
