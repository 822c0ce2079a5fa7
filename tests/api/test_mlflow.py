"""MLflow in and out, against a real `mlflow server` (tests/mlflow_server.py): a job whose model is
a registered model version or a run's folder, its sanitized model registered back with the
report's metrics, report.json, the trigger pictures and tags that lead back to the job; models
that only unpickling could load refused; MLflow URIs refused where no tracking server is set."""

import hashlib
import json
import uuid
from pathlib import Path
from uuid import UUID

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tests.api.support import assert_problem
from worker.runner import run_job
from worker.sanitize.architectures import build_model
from worker.sanitize.formats import model_format

PUBLIC_URL = "https://baerase.example.com"
FAST = {"recovery": {"screen_steps": 5, "refine_steps": 5, "generator_steps": 5, "families": ["patch"]},
        "detection": {"reference_epochs": 1}, "unlearning": {"epochs": 1, "rounds": 1}}


@pytest.fixture
def tracking_uri(mlflow_server) -> str:
    return mlflow_server.url


@pytest.fixture
def settings(settings, tracking_uri):
    return settings.model_copy(update={"mlflow_tracking_uri": tracking_uri, "public_url": PUBLIC_URL})


def register_folder(mlflow_server, folder: Path) -> tuple[str, str]:
    """Logs the files in ``folder`` to a new run of the Default experiment, and registers them as
    version 1 of a new registered model; returns its name and the run."""
    client = mlflow_server.client
    run_id = client.create_run("0").info.run_id
    client.log_artifacts(run_id, str(folder), "model")
    client.set_terminated(run_id)
    name = f"model-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
    return name, run_id


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def submit_uri(client, auth, uri: str, samples: bytes, config: dict):
    return client.post("/jobs", headers=auth, files={
        "model_url": (None, uri), "samples": ("clean.npz", samples, "application/octet-stream"),
        "config": (None, json.dumps(config))})


def run(app, job: dict):
    return run_job(app.state.sessions, app.state.store, app.state.settings, UUID(job["id"]))


def test_a_model_version_is_sanitized_and_registered_as_a_new_version(app, client, auth, samples,
                                                                       mlflow_server, tmp_path):
    weights = build_model("small_cnn", num_classes=10, in_channels=1).state_dict()
    # Class 0 wins on every input: every trigger search finds it, so the job goes through
    # unlearning and draws trigger pictures, and every kind of artifact reaches MLflow.
    weights["fc2.bias"][0] = 3.0
    buffer = tmp_path / "model.safetensors"
    save_file(weights, buffer)
    name, source_run = register_folder(mlflow_server, write_files(tmp_path / "v1", {
        "model.safetensors": buffer.read_bytes(), "README.md": b"weights of a small CNN"}))

    response = submit_uri(client, auth, f"models:/{name}/1", samples, FAST | {"arch": "small_cnn"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["model_source"] == f"models:/{name}/1" and job["model_format"] == "safetensors"
    assert job["registration"] is None
    assert run(app, job) == "succeeded"

    body = client.get(job["links"]["self"], headers=auth).json()
    result, registration = body["result"], body["registration"]
    assert registration["status"] == "registered" and registration["error"] is None
    assert registration["model_uri"] == f"models:/{name}/2"
    mlflow = mlflow_server.client
    version = mlflow.get_model_version(name, "2")
    job_tags = {"baerase.job_id": job["id"], "baerase.job_url": f"{PUBLIC_URL}/jobs/{job['id']}",
                "baerase.source": f"models:/{name}/1", "baerase.verdict": result["verdict"]}
    assert job_tags.items() <= version.tags.items()
    assert version.run_id == registration["run_id"]

    logged = mlflow.get_run(registration["run_id"])
    assert logged.info.status == "FINISHED"
    assert logged.info.experiment_id == mlflow.get_run(source_run).info.experiment_id
    assert job_tags.items() <= logged.data.tags.items()
    metrics = logged.data.metrics
    assert metrics["clean_accuracy_before"] == pytest.approx(result["clean_accuracy"]["before"])
    assert metrics["clean_accuracy_after"] == pytest.approx(result["clean_accuracy"]["after"])
    assert metrics["clean_accuracy_margin"] == pytest.approx(result["clean_accuracy"]["margin"])
    assert metrics["backdoor_probability"] == pytest.approx(result["backdoor_probability"])
    for target, asr in result["recovered_asr"].items():
        assert metrics[f"recovered_asr_after.class_{target}"] == pytest.approx(asr["after"])

    downloaded = Path(mlflow.download_artifacts(logged.info.run_id, "", str(tmp_path / "logged")))
    report = json.loads((downloaded / "baerase" / "report.json").read_text())
    assert report["verdict"] == result["verdict"] and report["config"]["arch"] == "small_cnn"
    triggers = client.get(job["links"]["triggers"], headers=auth).json()["triggers"]
    pictures = {Path(url).name for trigger in triggers for url in trigger["images"].values()}
    assert pictures and {p.name for p in (downloaded / "baerase" / "triggers").iterdir()} == pictures

    # The new version holds the sanitized model alone, as safetensors, byte for byte the job's.
    (model_file,) = (downloaded / "sanitized_model").iterdir()
    assert model_file.name == "model.safetensors" and model_format(model_file) == "safetensors"
    assert load_file(model_file).keys() == weights.keys()
    sanitized = client.get(job["links"]["model"], headers=auth).content
    assert hashlib.sha256(model_file.read_bytes()).digest() == hashlib.sha256(sanitized).digest()
    # ... and is itself a model a job can take.
    again = submit_uri(client, auth, f"models:/{name}/2", samples, FAST | {"arch": "small_cnn"})
    assert again.status_code == 202 and again.json()["model_format"] == "safetensors"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_scripted_model_logged_with_the_pytorch_flavor_is_taken(app, client, auth, samples, mlflow_server,
                                                                   monkeypatch, tmp_path):
    import mlflow.pytorch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)  # for MLflow's fluent API
    torch.manual_seed(0)
    scripted = torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(256, 10)))
    name = f"scripted-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run():
        # The flavor's file is then a TorchScript archive; logged as MLflow 3 logs models.
        logged = mlflow.pytorch.log_model(scripted, name="model", serialization_format="pickle",
                                          pip_requirements=["torch"])
    mlflow.register_model(logged.model_uri, name)

    response = submit_uri(client, auth, f"models:/{name}/1", samples, FAST)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["model_format"] == "torchscript"
    assert run(app, job) == "succeeded"

    registration = client.get(job["links"]["self"], headers=auth).json()["registration"]
    assert registration["status"] == "registered" and registration["model_uri"] == f"models:/{name}/2"
    (model_file,) = Path(mlflow_server.client.download_artifacts(registration["run_id"], "sanitized_model",
                                                                 str(tmp_path))).iterdir()
    assert model_format(model_file) == "torchscript"
    assert torch.jit.load(str(model_file))(torch.zeros(1, 1, 16, 16)).shape == (1, 10)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_run_folder_is_read_and_a_failed_logging_leaves_the_job_succeeded(app, client, auth, samples,
                                                                            torchscript_model, mlflow_server,
                                                                            tmp_path):
    mlflow = mlflow_server.client
    experiment = mlflow.create_experiment(f"gone-{uuid.uuid4().hex[:8]}")
    run_id = mlflow.create_run(experiment).info.run_id
    mlflow.log_artifacts(run_id, str(write_files(tmp_path / "weights", {"model.pt": torchscript_model})), "weights")
    response = submit_uri(client, auth, f"runs:/{run_id}/weights/model.pt", samples, FAST)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["model_source"] == f"runs:/{run_id}/weights/model.pt" and job["model_format"] == "torchscript"
    mlflow.delete_experiment(experiment)  # the sanitized model's run cannot go there now

    assert run(app, job) == "succeeded"
    body = client.get(job["links"]["self"], headers=auth).json()
    assert body["result"]["verdict"]
    registration = body["registration"]
    assert registration["status"] == "failed" and registration["model_uri"] is None
    assert "deleted" in registration["error"], registration["error"]
    assert client.get(job["links"]["model"], headers=auth).content


class OpensAFile(nn.Module):
    """Unpickling this model calls open(path, "w"): it creates the file."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_pickled_pytorch_flavor_version_is_refused(client, auth, samples, mlflow_server, tmp_path):
    import mlflow.pytorch

    marker = tmp_path / "pwned"
    mlflow.pytorch.save_model(OpensAFile(marker), tmp_path / "pickled", serialization_format="pickle",
                              pip_requirements=["torch"])
    # The payload is live: anything that unpickled it would create the file.
    torch.load(tmp_path / "pickled" / "data" / "model.pth", weights_only=False)
    assert marker.exists()
    marker.unlink()

    name, _ = register_folder(mlflow_server, tmp_path / "pickled")
    problem = assert_problem(submit_uri(client, auth, f"models:/{name}/1", samples, FAST | {"arch": "small_cnn"}),
                             422, "pytorch flavor", "pickles the whole model", "safetensors",
                             "mlflow.log_artifact", "create_model_version")
    assert problem["errors"][0]["loc"] == "model_url"
    assert not marker.exists()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("tracking_uri", [None])
def test_mlflow_uris_need_a_tracking_server(client, auth, samples):
    for uri in ("models:/digits/3", "runs:/0123456789abcdef0123456789abcdef/model"):
        assert_problem(submit_uri(client, auth, uri, samples, FAST), 422, uri, "BAERASE_MLFLOW_TRACKING_URI")
