"""Liveness, readiness, the schema migrations and the API description."""

import uuid

from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect, text

from app.cli import main as baerase
from app.core.config import Settings
from app.core.db import alembic_config, upgrade
from app.main import create_app
from app.core.models import Base


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ok", "checks": {"database": "ok", "broker": "not configured"}}


def test_readyz_checks_the_broker_in_production_mode(settings):
    with TestClient(create_app(settings.model_copy(update={"broker_url": "redis://127.0.0.1:6379/0"}))) as client:
        assert client.get("/readyz").json()["checks"]["broker"] == "ok"
    with TestClient(create_app(settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0"}))) as client:
        response = client.get("/readyz")
    assert response.status_code == 503 and "BAERASE_BROKER_URL" in response.json()["detail"]


def test_readyz_reports_an_unmigrated_or_unreachable_database(tmp_path):
    empty = Settings(_env_file=None, data_dir=tmp_path)
    with TestClient(create_app(empty)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503 and "baerase db upgrade" in response.json()["detail"]
    down = Settings(_env_file=None, data_dir=tmp_path, database_url="postgresql+psycopg://postgres@127.0.0.1:9/test")
    with TestClient(create_app(down)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503 and "BAERASE_DATABASE_URL" in response.json()["detail"]


def test_openapi_and_docs(client):
    spec = client.get("/openapi.json").json()
    upload = spec["paths"]["/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["allOf"] == [{"anyOf": [{"required": ["model"]}, {"required": ["model_url"]}]},
                               {"anyOf": [{"required": ["samples"]}, {"required": ["samples_url"]}]}]
    assert "/jobs/{job_id}/triggers/{trigger_id}.png" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_unknown_routes_are_problems(client):
    response = client.get("/nope")
    assert response.status_code == 404 and response.headers["content-type"] == "application/problem+json"
    assert "/docs" in response.json()["detail"]


def test_migrations_match_the_models_and_go_down_and_up(database_url):
    """The fixture has already upgraded; check, downgrade to nothing, upgrade again."""
    config = alembic_config(database_url)
    command.check(config)  # raises if the models and the migrations disagree
    command.downgrade(config, "base")
    engine = create_engine(database_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(database_url)
    assert set(inspect(engine).get_table_names()) >= set(Base.metadata.tables)
    engine.dispose()


def test_db_upgrade_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BAERASE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("BAERASE_DATABASE_URL", raising=False)
    assert baerase(["db", "upgrade"]) == 0
    assert "up to date" in capsys.readouterr().out
    engine = create_engine(f"sqlite:///{tmp_path / 'baerase.db'}")
    assert set(inspect(engine).get_table_names()) >= set(Base.metadata.tables)
    engine.dispose()


def test_upgrading_from_the_first_schema_keeps_the_data(database_url):
    """0002 adds columns that may not be NULL to tables that already have rows."""
    command.downgrade(alembic_config(database_url), "0001")
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO tenants (id, name, created_at) VALUES (1, 'acme', '2026-01-01')"))
        for status in ("queued", "running"):
            job_id = uuid.uuid4()
            connection.execute(text(
                "INSERT INTO jobs (id, tenant_id, status, created_at, started_at, progress_fraction, "
                "cancel_requested, config, model_format) VALUES (:id, 1, :status, '2026-01-02', "
                "'2026-01-03', 0, false, '{}', 'torchscript')"),
                # SQLite keeps UUIDs as 32 hex digits (SQLAlchemy's Uuid type there)
                {"id": job_id.hex if engine.dialect.name == "sqlite" else str(job_id), "status": status})
    upgrade(database_url)
    with engine.connect() as connection:
        secret = connection.scalar(text("SELECT webhook_secret FROM tenants"))
        queued, running = connection.execute(text(
            "SELECT status, attempts, enqueued_at, heartbeat_at FROM jobs ORDER BY status")).all()
    engine.dispose()
    assert secret.startswith("whsec_")
    assert (queued.status, queued.attempts, queued.heartbeat_at) == ("queued", 0, None)
    assert str(queued.enqueued_at).startswith("2026-01-02")
    assert (running.status, running.attempts) == ("running", 1)
    assert str(running.heartbeat_at).startswith("2026-01-03")  # stale: the sweeper requeues it
