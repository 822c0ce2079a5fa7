"""What every refusal in tests/security must show: a 4xx problem+json, and nothing left behind."""

from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.models import Job, WebhookDelivery

PROBLEM = "application/problem+json"


def assert_problem(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["type"] == "about:blank" and body["title"]
    for word in words:
        assert word in body["detail"], body["detail"]
    return body


@pytest.fixture
def nothing_stored(sessions, settings):
    """Checks, after the test, that no job, no webhook message and no file (staged or stored)
    was written."""
    yield
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 0
    assert [p for p in Path(settings.artifact_dir).rglob("*") if p.is_file()] == []
