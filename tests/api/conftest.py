"""The service under test on both databases: every test gets a migrated, empty database (a fresh
SQLite file, or this session's PostgreSQL schema truncated) and its own artifact directory."""

import io
import json
import threading
import uuid
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app.core.config import Settings
from app.core.security import create_api_key
from app.core.db import upgrade
from app.main import create_app
from app.core.models import Base
from tests.mlflow_server import mlflow_server  # noqa: F401  (a real MLflow server: test_mlflow.py)
from tests.s3_server import s3_server  # noqa: F401  (a real S3 API: test_object_storage.py)

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def postgres_url():
    """A schema of its own in the test database, migrated once, dropped at the end."""
    schema = f"baerase_api_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{POSTGRES}?options=-csearch_path%3D{schema}"
    try:
        upgrade(url)
        yield url
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.db'}"
        upgrade(url)
        return url
    url = request.getfixturevalue("postgres_url")
    engine = create_engine(url)
    with engine.begin() as connection:
        tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return url


@pytest.fixture
def settings(database_url, tmp_path) -> Settings:
    # status_cache_s=0: the tests check each change of a job at once, wherever it was made.
    return Settings(_env_file=None, database_url=database_url, data_dir=tmp_path / "data", api_key=None,
                    status_cache_s=0)


@pytest.fixture
def app(settings):
    return create_app(settings)


@pytest.fixture
def client(app):
    with TestClient(app) as client:
        yield client


@pytest.fixture
def sessions(app):
    return app.state.sessions


@pytest.fixture
def auth(sessions) -> dict:
    with sessions() as session:
        return {"Authorization": f"Bearer {create_api_key(session, 'acme')}"}


@pytest.fixture
def other_auth(sessions) -> dict:
    with sessions() as session:
        return {"Authorization": f"Bearer {create_api_key(session, 'globex')}"}


@pytest.fixture(scope="session")
def torchscript_model() -> bytes:
    """A tiny untrained TorchScript classifier of 16x16 grey images into 10 classes."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(256, 10))), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def state_dict_model() -> bytes:
    import torch

    from worker.sanitize.architectures import build_model

    buffer = io.BytesIO()
    torch.save(build_model("small_cnn", num_classes=10, in_channels=1).state_dict(), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def safetensors_model() -> bytes:
    from safetensors.numpy import save

    return save({"fc.weight": np.zeros((10, 256), np.float32), "fc.bias": np.zeros(10, np.float32)})


@pytest.fixture(scope="session")
def samples() -> bytes:
    """60 random 16x16 grey images, 6 per class, as the .npz the service takes."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, x=rng.integers(0, 256, (60, 16, 16), dtype=np.uint8), y=np.repeat(np.arange(10), 6))
    return buffer.getvalue()


@pytest.fixture(scope="session")
def image_folder_samples() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for label in ("cat", "dog"):
            for i in range(3):
                png = io.BytesIO()
                Image.new("L", (16, 16), 40 * i).save(png, "PNG")
                archive.writestr(f"{label}/{i}.png", png.getvalue())
    return buffer.getvalue()


@pytest.fixture
def submit(client, auth, torchscript_model, samples):
    """POSTs a job; every part can be replaced (None leaves it out)."""
    def post(model=torchscript_model, samples=samples, config=None, headers=auth,
             model_name="model.pt", samples_name="clean.npz"):
        files = {}
        if model is not None:
            files["model"] = (model_name, model, "application/octet-stream")
        if samples is not None:
            files["samples"] = (samples_name, samples, "application/octet-stream")
        data = {"config": config if isinstance(config, str) else json.dumps(config)} if config is not None else {}
        return client.post("/jobs", files=files, data=data, headers=headers)

    return post


@dataclass
class WebhookRequest:
    headers: dict[str, str]
    body: bytes


class WebhookReceiver:
    """A local HTTP server that records the requests it gets and answers each with the next of
    ``statuses`` (204 once they run out)."""

    def __init__(self):
        self.requests: list[WebhookRequest] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append(WebhookRequest({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def webhook_receiver():
    receiver = WebhookReceiver()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()
