"""What every refusal in tests/security must show: a 4xx problem+json, and nothing left behind."""

import threading
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import func, select

from app.main import create_app
from app.core.models import Job, WebhookDelivery
from tests.api.support import assert_problem, free_port, wait_for  # noqa: F401  (re-exported)


@pytest.fixture
def nothing_stored(sessions, settings):
    """Checks, after the test, that no job, no webhook message and no file (staged or stored)
    was written."""
    yield
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 0
    assert [p for p in Path(settings.artifact_dir).rglob("*") if p.is_file()] == []


@pytest.fixture
def server(settings):
    """The app of ``settings`` served by uvicorn on a free port, for tests that need requests
    at the same time (TestClient runs one at a time): (app, base URL)."""
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the server")
    yield app, f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=60)
