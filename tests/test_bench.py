"""The bench's quick path, end to end on scikit-learn's digits, so `baerase bench` cannot rot;
and the arithmetic its table rests on."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from app.cli import main as baerase
from bench.attacks import BadNets, MultiTrigger
from bench.baselines import DEFENSES
from bench.metrics import backdoor_rates, defense_effectiveness_rating, retuned, retuning_set
from bench.report import losses, write_table
from bench.run import SUITES, results_folder
from worker.sanitize.architectures import build_model


@pytest.mark.slow
def test_quick_bench_runs_every_defense_and_writes_table_and_plot(tmp_path):
    cache, results, out = tmp_path / "cache", tmp_path / "results", tmp_path / "out"
    command = ["bench", "--suite", "digits", "--quick", "--cache", str(cache), "--results", str(results),
               "--out", str(out)]
    assert baerase(command) == 0

    rows = [json.loads(p.read_text()) for p in results.glob("digits-*-quick/*/*/*.json")]
    assert {(r["attack"], r["defense"]) for r in rows} == {
        (attack, defense) for attack in ("clean", "badnets") for defense in ["none", *DEFENSES]}
    backdoored = next(r for r in rows if r["attack"] == "badnets" and r["defense"] == "none")
    assert backdoored["asr"] > 0.5  # the quick suite's backdoor is really there
    for r in rows:
        assert 0 <= r["ca"] <= 1 and r["seconds"] >= 0 and r["device"] == "cpu"
        if r["defense"] == "baerase":  # the verdict a user would act on is kept beside the numbers
            assert r["findings"]["verdict"] in ("clean", "suspicious", "removed", "residual")
        if r["defense"] in ("nc", "baerase-paper"):
            assert all(0 <= c < 10 for c in r["findings"]["flagged"])
        assert (r["asr"] is None) == (r["attack"] == "clean")
        # Every row, the undefended one too, is re-tuned; a clean model has no trigger to bring back.
        assert (r["asr_retuned"] is None) == (r["ca_retuned"] is None) == (r["attack"] == "clean")
        if r["attack"] == "badnets":
            assert 0 <= r["asr_retuned"] <= 1 and 0 <= r["ca_retuned"] <= 1

    table = (out / "benchmarks-digits.md").read_text()
    assert "baerase bench --suite digits --quick" in table
    for label, _ in DEFENSES.values():
        assert f"| {label} |" in table.split("## Where BAERASE loses or fails")[0]
    assert "| **mean re-tuned ASR** |" in table and "| re-tuned ASR |" in table
    assert "re-tuning adds 3 poisoned ones" in table  # 1% of the defender's 300 images
    assert (out / "benchmarks-digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Published, not measured here" in table and "backdoorbench.github.io" in table

    # A second run reuses every cached row instead of defending again.
    stamps = {p: p.stat().st_mtime_ns for p in results.rglob("*.json")}
    assert baerase(command) == 0
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*.json")} == stamps


class Corner(nn.Module):
    """Says class 1 when the top-left pixel is lit, class 0 otherwise."""

    def forward(self, x):
        lit = (x[:, 0, 0, 0] > 0.5).float()
        return torch.stack([1 - lit, lit], dim=1)


class TwoTriggers:
    def triggers(self):
        def light(x):
            x = x.clone()
            x[:, :, 0, 0] = 1.0
            return x

        return [(light, 1), (lambda x: x, 1)]


def test_backdoor_rates_average_over_triggers_and_skip_target_class_images():
    x = torch.zeros(4, 1, 4, 4)
    y = torch.tensor([0, 0, 0, 1])
    asr, ra = backdoor_rates(Corner(), TwoTriggers(), x, y)
    assert asr == pytest.approx(0.5)  # the first trigger always works, the second never
    assert ra == pytest.approx(0.5)


def test_defense_effectiveness_rating_follows_backdoorbench():
    before = {"ca": 0.90, "asr": 0.98}
    assert defense_effectiveness_rating(before, {"ca": 0.90, "asr": 0.0}) == pytest.approx(0.99)
    assert defense_effectiveness_rating(before, {"ca": 0.80, "asr": 0.0}) == pytest.approx(0.94)
    assert defense_effectiveness_rating(before, {"ca": 0.95, "asr": 0.99}) == pytest.approx(0.5)
    assert defense_effectiveness_rating({"ca": 0.9, "asr": None}, {"ca": 0.9, "asr": None}) is None


def row(attack, defense, ca, asr, before_ca=0.9, before_asr=0.95, **measured):
    before = {"ca": before_ca, "asr": None if asr is None else before_asr}
    after = {"ca": ca, "asr": asr}
    return {"arch": "small_cnn", "attack": attack, "defense": defense, **after, "before": before,
            "der": defense_effectiveness_rating(before, after), **measured}


def test_losses_name_every_baseline_that_beats_baerase():
    rows = [row("badnets", "baerase", 0.89, 0.01), row("badnets", "nc", 0.88, 0.02),
            row("blended", "baerase", 0.90, 0.95), row("blended", "anp", 0.85, 0.02),
            row("clean", "baerase", 0.85, None), row("clean", "ft", 0.90, None),
            row("trojan", "baerase", 0.90, 0.95)]
    found = losses(rows)
    assert len(found) == 3
    assert "blended" in found[0] and "ANP" in found[0]
    assert "clean" in found[1] and "FT" in found[1]
    assert "trojan" in found[2] and "survived" in found[2]
    assert losses(rows[:2]) == ["Nowhere in this run."]


def test_losses_name_a_backdoor_that_re_tuning_brings_back():
    rows = [row("badnets", "baerase", 0.89, 0.01, asr_retuned=0.85),
            row("blended", "baerase", 0.89, 0.01, asr_retuned=0.05),
            row("sig", "baerase", 0.89, 0.01)]  # measured before the re-tuning column: nothing to say
    found = losses(rows)
    assert len(found) == 1 and "badnets" in found[0] and "re-tuned ASR 85.0" in found[0]


def test_losses_name_a_verdict_that_promises_more_than_was_measured():
    def baerase(attack, asr, verdict, **measured):
        findings = {"verdict": verdict, "backdoor_probability": 0.5, "detected_targets": []}
        return row(attack, "baerase", 0.9, asr, findings=findings, **measured)

    found = losses([baerase("sig", 0.95, "clean"), baerase("blended", 0.95, "suspicious"),
                    baerase("badnets", 0.13, "removed", asr_retuned=0.78), baerase("trojan", 0.01, "removed"),
                    baerase("clean", None, "clean")])
    assert [line for line in found if "false all-clear" in line] == [
        "- small_cnn / sig: BAERASE said `clean` on a backdoored model (ASR 95.0): a false all-clear"]
    [over_claim] = [line for line in found if "over-claim" in line]
    assert "badnets" in over_claim and "ASR is 13.0 (re-tuned 78.0)" in over_claim
    # An untouched model's line says what the engine concluded: suspicious is no all-clear.
    assert any("blended" in line and "`suspicious`, p 0.50" in line and "survived" in line for line in found)


def table_row(attack, defense, asr, **measured):
    return row(attack, defense, 0.9, asr, ra=None if asr is None else 0.05, seconds=1.0, cost=2.0,
               commit="abc1234", finished="2026-01-01 00:00:00", **measured)


def test_table_renders_rows_from_before_the_re_tuning_and_device_fields(tmp_path):
    old = [table_row("badnets", d, 0.9 if d == "none" else 0.02) for d in ("none", "baerase")]
    verdict = {"verdict": "removed", "backdoor_probability": 1.0, "detected_targets": [3]}
    new = [table_row("blended", d, 0.02, asr_retuned=0.5, ca_retuned=0.88, device="cuda",
                     machine="x86_64, 16 cores, GPU NVIDIA H200", findings=verdict if d == "baerase" else {})
           for d in ("none", "baerase")]
    path = tmp_path / "benchmarks.md"
    write_table(old + new, path, command="baerase bench --suite digits", setup="digits: ...",
                order={"arch": ["small_cnn"], "attack": ["badnets", "blended"], "defense": ["none", "baerase"]})
    table = path.read_text()
    measured = "2026-01-01, abc1234"
    assert (f"| badnets | BAERASE | 90.0 | 2.0 | 5.0 | 96.5 | not run | 1 | 2 | cpu | not recorded | "
            f"{measured} |") in table
    assert (f"| blended | BAERASE | 90.0 | 2.0 | 5.0 | 96.5 | 50.0 | 1 | 2 | cuda | `removed`, p 1.00; targets 3 | "
            f"{measured} |") in table
    # The undefended model concludes nothing, and no finding is missing from its row.
    [undefended] = [line for line in table.splitlines() if line.startswith("| badnets | none |")]
    assert undefended.endswith(f"| cpu | - | {measured} |")
    # A mean over some of the models would not compare with the others: not run until all have it.
    assert "| **mean re-tuned ASR** | not run | not run |" in table
    assert "not recorded (2 rows)" in table and "GPU NVIDIA H200 (2 rows)" in table


def test_retuning_set_adds_one_percent_of_triggered_images_of_other_classes_labelled_with_the_target():
    x, y = torch.rand(300, 1, 16, 16), torch.arange(300) % 10
    attack = BadNets(target=3)
    xr, yr = retuning_set(attack, x, y)
    assert len(xr) == 303 and torch.equal(xr[:300], x) and torch.equal(yr[:300], y)
    poisoned, labels = xr[300:], yr[300:]
    assert (labels == 3).all() and (poisoned[..., 12:15, 12:15] == 1).all()
    originals = [next(i for i in range(300) if torch.equal(attack.apply(x[i:i + 1])[0], p)) for p in poisoned]
    assert all(y[i] != 3 for i in originals) and len(set(originals)) == 3
    # At least one image, and several triggers share the poisoned images.
    assert len(retuning_set(attack, x[:20], y[:20])[0]) == 21
    two = MultiTrigger(targets=(1, 6))
    assert sorted(retuning_set(two, x, y)[1][300:].tolist()) == [1, 1, 6]


def test_retuning_trains_a_copy_and_reports_its_ca_and_asr():
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1).eval()
    x, y = torch.rand(100, 1, 16, 16), torch.arange(100) % 10
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measured = retuned(model, BadNets(target=3), (x, y), (x, y))
    assert set(measured) == {"ca_retuned", "asr_retuned"}
    assert 0 <= measured["ca_retuned"] <= 1 and 0 <= measured["asr_retuned"] <= 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert retuned(model, None, (x, y), (x, y)) == {"ca_retuned": None, "asr_retuned": None}


def test_cifar10_suite_has_a_vgg_with_and_one_without_batchnorm():
    suite = SUITES["cifar10"]
    norms = [any(isinstance(m, nn.BatchNorm2d) for m in build_model(arch, 10, 3).modules()) for arch in suite.archs]
    assert sorted(norms) == [False, True]
    assert suite.augment is not None and "multi" not in suite.attacks


def test_results_of_victims_trained_otherwise_lie_apart():
    fmnist = SUITES["fmnist"]
    shorter = replace(fmnist, train_size=30_000, epochs=3)
    folders = {results_folder(Path("c"), s, quick) for s in (fmnist, shorter) for quick in (False, True)}
    assert len(folders) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where there is no CUDA device")
def test_device_cuda_without_a_cuda_device_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        baerase(["bench", "--suite", "digits", "--device", "cuda"])
    assert exit_.value.code == 2 and "no CUDA device" in capsys.readouterr().err
