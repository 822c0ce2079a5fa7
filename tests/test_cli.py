"""`baerase sanitize` end to end, as a user runs it."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench.datasets import fashion_mnist
from bench.metrics import evaluate
from tests.live_server import QUICK_CONFIG, backdoored_digits  # noqa: F401
from worker.sanitize.config import SanitizeConfig


def baerase(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.xdist_group("backdoored_case")
def test_backdoor_is_found_and_erased_and_the_verdict_follows_the_re_tuning_check(backdoored_case, tmp_path):
    out = tmp_path / "out"
    run = baerase("sanitize", backdoored_case.model, "--samples", backdoored_case.samples, "--out", out)
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert 0 in report["detected_targets"] and report["backdoor_detected"] is True
    assert set(report["timings_s"]) == {"validate", "reference", "recovery", "unlearning", "verification", "total"}
    # Unlearning erases this backdoor's surface (the true trigger falls under 10%, below); whether
    # what is left counts as dormant is the re-tuning check's call, near its line on this model
    # (docs/population.md, tenth sitting). Either way the verdict follows the check: every class it
    # finds dormant is residual, and "removed" only when there is none.
    assert report["verdict"] in ("removed", "residual") and report["model_changed"]
    retuning = report["verification"]["retuning"]
    assert 0 in [r["class"] for r in retuning]
    dormant = {r["class"] for r in retuning if r["probability"] >= SanitizeConfig().detection.suspicious_probability}
    assert dormant <= set(report["residual_targets"])
    assert (report["verdict"] == "removed") == (not report["residual_targets"])
    assert report["recovered_asr"]["0"]["after"] <= 0.05
    pngs = sorted(p.name for p in (out / "triggers").glob("*.png"))
    assert any(name.startswith("class0_") and "stamped" in name for name in pngs)

    x, y = fashion_mnist("test")
    x, y = x[:5000], y[:5000]
    before = torch.jit.load(str(backdoored_case.model))
    after = torch.jit.load(str(out / "model.sanitized.pt"))  # the output is named after the input, model.pt
    attack = backdoored_case.attack
    before, after = evaluate(before, attack, x, y), evaluate(after, attack, x, y)
    assert before["asr"] > 0.9  # the backdoor was really there
    assert after["asr"] < 0.10
    # Unlearning costs this 2 x 2 model 2.0 points on all 10,000 test images (3.1 on these 5,000 at
    # a smaller radius), 0.4 of them for path-aware minimisation, which more than halves how far
    # re-tuning brings the backdoor back (docs/method.md, section 4).
    assert after["ca"] > before["ca"] - 0.04


@pytest.mark.slow
@pytest.mark.xdist_group("clean_case")
def test_clean_model_is_returned_untouched(clean_case, tmp_path):
    out = tmp_path / "out"
    run = baerase("sanitize", clean_case.model, "--samples", clean_case.samples, "--out", out, "--quiet")
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["backdoor_detected"] is False and report["detected_targets"] == []
    assert (out / "model.sanitized.pt").read_bytes() == clean_case.model.read_bytes()
    assert report["clean_accuracy"]["before"] == report["clean_accuracy"]["after"]


@pytest.mark.slow
def test_same_seed_gives_the_same_report(backdoored_digits, tmp_path):
    # A run that goes through every stage (unlearning, verification), on the small digits model.
    model, samples = backdoored_digits
    config = tmp_path / "config.json"
    config.write_text(json.dumps(QUICK_CONFIG))
    reports = []
    for name in ("a", "b"):
        run = baerase("sanitize", model, "--samples", samples, "--out", tmp_path / name, "--config", config,
                      "--seed", 3, "--quiet")
        assert run.returncode == 0, run.stderr
        report = json.loads((tmp_path / name / "report.json").read_text())
        reports.append({k: v for k, v in report.items() if k != "timings_s"})
    assert reports[0]["unlearning"] is not None
    assert reports[0] == reports[1]


def bad_input_cases(case, tmp_path):
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, x=np.zeros((40, 28, 28, 3), np.uint8), y=np.zeros(40, np.int64))
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=np.zeros((40, 28, 28), np.uint8), y=np.full(40, 12))
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 28, 28), np.uint8), y=np.zeros(0, np.int64))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    bad_config = tmp_path / "bad.json"
    bad_config.write_text('{"recovery": {"stepz": 3}}')
    broken_config = tmp_path / "broken.json"
    broken_config.write_text("{not json")
    s = case.samples
    return [
        ([tmp_path / "missing.pt", "--samples", s], "does not exist"),
        ([junk, "--samples", s], "not a TorchScript archive"),
        ([case.model, "--samples", tmp_path / "missing.npz"], "does not exist"),
        ([case.model, "--samples", rgb], "failed on a batch"),
        ([case.model, "--samples", labels], "labels must lie in [0, 10)"),
        ([case.model, "--samples", empty], "empty"),
        ([case.model, "--samples", s, "--num-classes", "7"], "num_classes is 7"),
        ([case.model, "--samples", s, "--config", bad_config], "recovery.stepz"),
        ([case.model, "--samples", s, "--config", broken_config], "cannot read config"),
        ([case.model, "--samples", s, "--arch", "alexnet"], "unknown arch"),
    ]


@pytest.mark.slow
@pytest.mark.xdist_group("clean_case")
def test_every_bad_input_gets_one_clear_line(clean_case, tmp_path):
    for args, message in bad_input_cases(clean_case, tmp_path):
        run = baerase("sanitize", *args, "--out", tmp_path / "out", "--quiet")
        assert run.returncode == 2, (args, run.stderr)
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, run.stderr)
        assert message in lines[0], (args, lines[0])
