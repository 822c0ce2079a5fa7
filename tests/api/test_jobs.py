"""The job resource: submit, read, list, idempotency, cancel, delete; on SQLite and PostgreSQL."""

from pathlib import Path
from uuid import UUID

from app.core.lifecycle import claim

PROBLEM = "application/problem+json"


def test_submit_queues_a_job_and_stores_its_files(client, submit, auth, settings, torchscript_model):
    response = submit(config={"seed": 3})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued" and job["model_format"] == "torchscript"
    assert job["config"]["seed"] == 3 and job["config"]["recovery"]["screen_steps"] == 30  # defaults filled
    assert job["inputs"]["model"]["size"] == len(torchscript_model)
    assert job["links"]["model"] == f"/jobs/{job['id']}/model"
    stored = sorted(p.name for p in (Path(settings.artifact_dir) / "jobs" / job["id"]).iterdir())
    assert stored == ["model.pt", "samples.npz"]

    read = client.get(job["links"]["self"], headers=auth)
    assert read.status_code == 200 and read.json() == job
    assert read.headers["retry-after"] == "2"  # not finished yet
    assert job["progress"] == {"stage": None, "fraction": 0.0, "message": None}


def test_weights_and_image_folders_are_accepted_with_their_kind(
        submit, state_dict_model, safetensors_model, image_folder_samples, settings):
    weights = submit(model=state_dict_model, config={"arch": "small_cnn"}, samples=image_folder_samples,
                     samples_name="images.zip")
    assert weights.status_code == 202 and weights.json()["model_format"] == "state_dict"
    tensors = submit(model=safetensors_model, model_name="m.safetensors", config={"arch": "small_cnn"})
    assert tensors.status_code == 202 and tensors.json()["model_format"] == "safetensors"
    folder = Path(settings.artifact_dir) / "jobs"
    assert sorted(p.name for p in (folder / weights.json()["id"]).iterdir()) == ["model.pt", "samples.zip"]
    assert sorted(p.name for p in (folder / tensors.json()["id"]).iterdir()) == ["model.safetensors", "samples.npz"]


def test_list_is_newest_first_paginated_and_filtered(client, submit, auth, sessions):
    ids = [submit(config={"seed": i}).json()["id"] for i in range(5)]
    claim(sessions, UUID(ids[1]))  # one running job to filter by

    seen, token = [], None
    while True:
        params = {"page_size": 2} | ({"page_token": token} if token else {})
        page = client.get("/jobs", params=params, headers=auth).json()
        assert len(page["jobs"]) <= 2
        seen += [job["id"] for job in page["jobs"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert seen == ids[::-1]

    running = client.get("/jobs", params={"status": "running"}, headers=auth).json()
    assert [job["id"] for job in running["jobs"]] == [ids[1]] and running["next_page_token"] is None
    queued = client.get("/jobs", params={"status": "queued"}, headers=auth).json()
    assert len(queued["jobs"]) == 4


def test_list_rejects_bad_parameters(client, auth):
    for params, where in (({"page_size": 0}, "page_size"), ({"page_size": 101}, "page_size"),
                          ({"status": "done"}, "status"), ({"page_token": "garbage"}, "page_token")):
        response = client.get("/jobs", params=params, headers=auth)
        assert response.status_code == 422, params
        assert response.headers["content-type"] == PROBLEM and where in response.json()["detail"]


def test_idempotency_key_returns_the_first_job(client, submit, auth, samples):
    headers = auth | {"Idempotency-Key": "upload-42"}
    first = submit(headers=headers, config={"seed": 1})
    retry = submit(headers=headers, config={"seed": 1})
    assert first.status_code == retry.status_code == 202
    assert retry.json()["id"] == first.json()["id"] and retry.headers["idempotent-replayed"] == "true"
    assert len(client.get("/jobs", headers=auth).json()["jobs"]) == 1

    changed = submit(headers=headers, config={"seed": 2})
    assert changed.status_code == 422 and "different request" in changed.json()["detail"]
    other_key = submit(headers=auth | {"Idempotency-Key": "upload-43"}, config={"seed": 1})
    assert other_key.json()["id"] != first.json()["id"]


def test_cancel_a_queued_job_at_once(client, submit, auth):
    job = submit().json()
    response = client.post(job["links"]["cancel"], headers=auth)
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled" and response.json()["finished_at"]
    assert "retry-after" not in client.get(job["links"]["self"], headers=auth).headers


def test_cancel_a_running_job_asks_the_worker(client, submit, auth, sessions):
    job = submit().json()
    assert claim(sessions, UUID(job["id"]))
    response = client.post(job["links"]["cancel"], headers=auth)
    assert response.status_code == 202
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True


def test_delete_removes_rows_and_files(client, submit, auth, settings):
    job = submit(headers=auth | {"Idempotency-Key": "k"}).json()
    folder = Path(settings.artifact_dir) / "jobs" / job["id"]
    assert folder.is_dir()
    assert client.delete(job["links"]["self"], headers=auth).status_code == 204
    assert not folder.exists()
    gone = client.get(job["links"]["self"], headers=auth)
    assert gone.status_code == 404 and gone.headers["content-type"] == PROBLEM
    assert client.delete(job["links"]["self"], headers=auth).status_code == 404
    # The idempotency record went with the job: the key may be used again.
    assert submit(headers=auth | {"Idempotency-Key": "k"}).json()["id"] != job["id"]


def test_a_running_job_cannot_be_deleted(client, submit, auth, sessions, settings):
    job = submit().json()
    claim(sessions, UUID(job["id"]))
    response = client.delete(job["links"]["self"], headers=auth)
    assert response.status_code == 409 and "cancel it" in response.json()["detail"]
    assert (Path(settings.artifact_dir) / "jobs" / job["id"] / "model.pt").is_file()


def test_results_are_409_until_the_job_has_succeeded(client, submit, auth):
    job = submit().json()
    for link in ("model", "triggers", "report"):
        response = client.get(job["links"][link], headers=auth)
        assert response.status_code == 409, link
        assert response.headers["content-type"] == PROBLEM
        assert "queued" in response.json()["detail"] and "succeeded" in response.json()["detail"]
    client.post(job["links"]["cancel"], headers=auth)
    response = client.get(job["links"]["model"], headers=auth)
    assert response.status_code == 409 and "cancelled" in response.json()["detail"]
    assert client.post(job["links"]["cancel"], headers=auth).status_code == 202  # still cancelled


def test_unknown_job_ids_are_404(client, auth):
    for path in ("/jobs/not-a-uuid", "/jobs/7d1c3f52-8a0e-4c55-9d7f-0f3e0c6b9a11/model",
                 "/jobs/7d1c3f52-8a0e-4c55-9d7f-0f3e0c6b9a11/triggers/class0_mask_mask.png"):
        response = client.get(path, headers=auth)
        assert response.status_code == 404 and response.headers["content-type"] == PROBLEM
