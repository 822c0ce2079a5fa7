"""Bad uploads are refused before a job is queued, with a problem+json that says what to fix,
and leave nothing behind."""

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.api.support import assert_problem

def zip_of(**members: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def nothing_stored(client, auth, settings):
    """Checks, after the test, that no job and no file (staged or stored) was left."""
    yield
    assert client.get("/jobs", headers=auth).json()["jobs"] == []
    artifacts = Path(settings.artifact_dir)
    assert [p for p in artifacts.rglob("*") if p.is_file()] == []



@pytest.mark.usefixtures("nothing_stored")
class TestRefusedUploads:
    def test_wrong_model_kind_is_415(self, submit):
        assert_problem(submit(model=b"just some text, not a model"), 415, "model.pt", "TorchScript")
        png = b"\x89PNG\r\n\x1a\n" + bytes(100)
        assert_problem(submit(model=png, model_name="cat.png"), 415, "cat.png")

    def test_wrong_samples_kind_is_415(self, submit):
        assert_problem(submit(samples=b"x,y\n1,2\n" * 10, samples_name="clean.csv"), 415, "clean.csv", ".npz")

    def test_a_body_that_is_not_multipart_is_415(self, client, auth):
        assert_problem(client.post("/jobs", json={"model": "m.pt"}, headers=auth), 415, "multipart/form-data")

    def test_truncated_files_are_422(self, submit, torchscript_model, safetensors_model, samples):
        half = len(torchscript_model) // 2
        assert_problem(submit(model=torchscript_model[:half]), 422, "not a complete zip")
        assert_problem(submit(model=safetensors_model[:-7], model_name="m.safetensors",
                              config={"arch": "small_cnn"}), 422, "truncated")
        assert_problem(submit(samples=samples[:-30]), 422, "clean.npz", "not a complete zip")

    def test_zips_of_the_wrong_content_are_422(self, submit):
        assert_problem(submit(model=zip_of(**{"notes.txt": b"hi"})), 422, "neither a TorchScript")
        exported = zip_of(**{"model/archive_format": b"pt2", "model/models/model.json": b"{}"})
        assert_problem(submit(model=exported, model_name="model.pt2"), 422, "torch.export archive",
                       "TorchScript")
        no_labels = io.BytesIO()
        np.savez(no_labels, x=np.zeros((4, 8, 8), np.uint8))
        assert_problem(submit(samples=no_labels.getvalue()), 422, "x and y")
        assert_problem(submit(samples=zip_of(**{"readme.md": b"#"})), 422, "class folders")

    def test_bad_config_is_422(self, submit):
        assert_problem(submit(config="{seed: 0"), 422, "not valid JSON")
        assert_problem(submit(config="[1, 2]"), 422, "JSON object")
        unknown_arch = assert_problem(submit(config={"arch": "resnet1000"}), 422, "resnet1000", "small_cnn",
                                      "torchvision:resnet18")
        assert unknown_arch["errors"][0]["loc"] == "config"
        typo = assert_problem(submit(config={"recovery": {"stepz": 5}}), 422, "config.recovery.stepz")
        assert typo["errors"] == [{"loc": "config.recovery.stepz", "msg": "Extra inputs are not permitted"}]
        assert_problem(submit(config={"seed": "zero"}), 422, "config.seed")
        assert_problem(submit(config={"webhook_url": "not a url"}), 422, "config.webhook_url")

    def test_bare_weights_need_an_architecture(self, submit, state_dict_model):
        assert_problem(submit(model=state_dict_model), 422, "bare weights", '"arch"')

    def test_form_fields_are_checked(self, submit, client, auth, torchscript_model, samples):
        assert_problem(submit(samples=None), 422, "lacks samples")
        assert_problem(submit(model=None, config={}), 422, "lacks model")
        extra = client.post("/jobs", headers=auth, files={
            "model": ("m.pt", torchscript_model), "samples": ("s.npz", samples), "notes": ("n.txt", b"hi")})
        assert_problem(extra, 422, "'notes'")
        twice = client.post("/jobs", headers=auth, files=[
            ("model", ("m.pt", torchscript_model)), ("model", ("m.pt", torchscript_model)),
            ("samples", ("s.npz", samples))])
        assert_problem(twice, 422, "two 'model'")

    def test_uploads_over_the_limits_are_413(self, client, auth, settings, torchscript_model, samples):
        limited = create_app(settings.model_copy(update={"max_model_bytes": 1000, "max_samples_bytes": 1000}))
        with TestClient(limited) as small:
            files = {"model": ("model.pt", torchscript_model), "samples": ("s.npz", samples)}
            assert_problem(small.post("/jobs", files=files, headers=auth), 413, "model.pt", "1000 bytes")
            files = {"model": ("model.pt", torchscript_model[:900]), "samples": ("s.npz", samples)}
            assert_problem(small.post("/jobs", files=files, headers=auth), 413, "s.npz")
            # Announced as too large: refused before the body is read.
            files = {"model": ("big.pt", b"PK\x03\x04" + bytes(300_000)), "samples": ("s.npz", samples)}
            assert_problem(small.post("/jobs", files=files, headers=auth), 413, "the request is")
        assert len(samples) > 1000 and len(torchscript_model) > 1000


def test_config_field_is_limited(submit):
    assert_problem(submit(config=json.dumps({"class_names": ["x" * 100] * 1000})), 413, "config")


def test_a_wrapped_checkpoint_of_a_library_architecture_is_queued(submit, state_dict_model):
    """The API cannot tell whether torchvision has the name (it never loads torch): the worker does."""
    import torch

    wrapped = io.BytesIO()
    torch.save({"state_dict": torch.load(io.BytesIO(state_dict_model), weights_only=True), "epoch": 3}, wrapped)
    response = submit(model=wrapped.getvalue(), config={"arch": "torchvision:resnet18"})
    assert response.status_code == 202, response.text
    assert response.json()["model_format"] == "state_dict"
