"""API keys and tenant isolation."""

from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from app.cli import main as baerase
from app.main import create_app
from app.core.models import ApiKey

PROBLEM = "application/problem+json"


def test_requests_without_a_valid_key_are_401(client, submit):
    for headers in ({}, {"Authorization": "Bearer bae_wrong"}, {"Authorization": "Basic dXNlcjpwdw=="}):
        response = client.get("/jobs", headers=headers)
        assert response.status_code == 401 and response.headers["content-type"] == PROBLEM
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "baerase keys create" in response.json()["detail"]
    assert submit(headers={}).status_code == 401


def test_a_tenant_sees_only_its_own_jobs(client, submit, auth, other_auth):
    job = submit().json()
    assert client.get("/jobs", headers=other_auth).json()["jobs"] == []
    for method, link in (("get", "self"), ("post", "cancel"), ("delete", "self"), ("get", "model"),
                         ("get", "triggers"), ("get", "report")):
        response = client.request(method.upper(), job["links"][link], headers=other_auth)
        assert response.status_code == 404, (method, link)
        assert response.json()["detail"] == f"there is no job {job['id']}; list yours with GET /jobs"
    png = client.get(f"{job['links']['triggers']}/class0_mask_mask.png", headers=other_auth)
    assert png.status_code == 404
    assert client.get(job["links"]["self"], headers=auth).json()["status"] == "queued"


def test_idempotency_keys_are_per_tenant(submit, auth, other_auth):
    mine = submit(headers=auth | {"Idempotency-Key": "same"}).json()
    theirs = submit(headers=other_auth | {"Idempotency-Key": "same"}).json()
    assert mine["id"] != theirs["id"]


def test_keys_are_stored_hashed(sessions, auth):
    key = auth["Authorization"].removeprefix("Bearer ")
    with sessions() as session:
        stored = session.scalars(select(ApiKey)).one()
    assert key not in (stored.key_hash, stored.prefix) and len(stored.key_hash) == 64


def test_the_environment_key_is_registered_once(settings):
    with_key = settings.model_copy(update={"api_key": SecretStr("local-secret")})
    for _ in range(2):  # a restart must not add it twice
        with TestClient(create_app(with_key)) as client:
            assert client.get("/jobs", headers={"Authorization": "Bearer local-secret"}).status_code == 200
    with create_app(with_key).state.sessions() as session:
        assert [key.tenant.name for key in session.scalars(select(ApiKey))] == ["local"]


def test_keys_create_prints_a_working_key(client, database_url, monkeypatch, capsys):
    monkeypatch.setenv("BAERASE_DATABASE_URL", database_url)
    assert baerase(["keys", "create", "--tenant", "initech"]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert key.startswith("bae_") and "initech" in out.err
    assert client.get("/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
