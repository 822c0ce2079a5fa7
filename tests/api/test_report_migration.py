"""Migration 0003 on both databases: a job stored by 0002 (report copies in columns and metric
rows, trigger pictures as blobs) keeps everything, with its pictures moved into the artifact
store and its durations in the /metrics histograms; and the downgrade puts it all back."""

import json
import uuid

from alembic import command
from sqlalchemy import create_engine, text

from app.core.db import alembic_config, upgrade

PNG = b"\x89PNG\r\n\x1a\nnot really"
REPORT = {"backdoor_detected": True, "detected_targets": [0], "flag_log_ratio": 3.9,
          "class_scores": [{"class": 0, "family": "mask", "log_ratio": 5.0}],
          "clean_accuracy": {"before": 0.9, "after": 0.88},
          "recovered_asr": {"0": {"before": 1.0, "after": 0.01}},
          "timings_s": {"recovery": 12.5, "total": 20.0},
          "triggers": [{"class": 0, "family": "mask", "kind": "mask", "file": "triggers/class0_mask_mask.png"}]}


def test_0003_moves_trigger_pictures_to_the_store_and_back(database_url, tmp_path):
    artifacts = tmp_path / "artifacts"
    command.downgrade(alembic_config(database_url), "0002")
    engine = create_engine(database_url)
    job_id = uuid.uuid4()
    stored_id = job_id.hex if engine.dialect.name == "sqlite" else str(job_id)  # SQLAlchemy's Uuid on SQLite
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO tenants (id, name, created_at, webhook_secret) "
                                "VALUES (1, 'acme', '2026-01-01', 'whsec_AAAA')"))
        connection.execute(text(
            "INSERT INTO jobs (id, tenant_id, status, created_at, started_at, finished_at, enqueued_at, "
            "attempts, progress_fraction, cancel_requested, config, model_format, backdoor_detected, "
            "detected_targets, report) VALUES (:id, 1, 'succeeded', '2026-01-02 00:00:00', "
            "'2026-01-02 00:00:00', '2026-01-02 00:00:25', '2026-01-02 00:00:00', 1, 1, false, '{}', "
            "'torchscript', true, '[0]', :report)"), {"id": stored_id, "report": json.dumps(
                {k: v for k, v in REPORT.items() if k != "detected_targets"})})
        connection.execute(text("INSERT INTO trigger_images (job_id, name, class_index, family, kind, score, png) "
                                "VALUES (:id, 'class0_mask_mask', 0, 'mask', 'mask', 5.0, :png)"),
                           {"id": stored_id, "png": PNG})
        for name, value in (("timings_s.recovery", 12.5), ("timings_s.total", 20.0), ("clean_accuracy.after", 0.88)):
            connection.execute(text("INSERT INTO job_metrics (job_id, name, value) VALUES (:id, :name, :value)"),
                               {"id": stored_id, "name": name, "value": value})

    upgrade(database_url, artifact_dir=artifacts)
    picture = artifacts / "jobs" / str(job_id) / "triggers" / "class0_mask_mask.png"
    assert picture.read_bytes() == PNG
    with engine.connect() as connection:
        buckets = connection.execute(text(
            "SELECT histogram, label, count, total_s FROM duration_buckets ORDER BY histogram")).all()
        report = connection.scalar(text("SELECT report FROM jobs"))
    assert [tuple(row) for row in buckets] == [("job", "succeeded", 1, 25.0), ("stage", "recovery", 1, 12.5)]
    report = report if isinstance(report, dict) else json.loads(report)
    assert report["detected_targets"] == [0]  # from its column, which is gone

    command.downgrade(alembic_config(database_url, artifacts), "0002")
    with engine.connect() as connection:
        png = connection.scalar(text("SELECT png FROM trigger_images WHERE name = 'class0_mask_mask'"))
        metrics = dict(connection.execute(text("SELECT name, value FROM job_metrics")).all())
        targets = connection.scalar(text("SELECT detected_targets FROM jobs"))
    engine.dispose()
    assert bytes(png) == PNG
    assert metrics["timings_s.recovery"] == 12.5 and metrics["recovered_asr.0.after"] == 0.01
    assert targets in ([0], "[0]")
    upgrade(database_url, artifact_dir=artifacts)
