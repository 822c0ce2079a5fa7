"""The bench's quick path, end to end on scikit-learn's digits, so `baerase bench` cannot rot;
and the arithmetic its table rests on."""

import json

import pytest
import torch
from torch import nn

from app.cli import main as baerase
from bench.baselines import DEFENSES
from bench.metrics import backdoor_rates, defense_effectiveness_rating
from bench.report import losses


@pytest.mark.slow
def test_quick_bench_runs_every_defense_and_writes_table_and_plot(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    assert baerase(["bench", "--suite", "digits", "--quick", "--cache", str(cache), "--out", str(out)]) == 0

    rows = [json.loads(p.read_text()) for p in (cache / "results" / "digits-quick").glob("*/*/*.json")]
    assert {(r["attack"], r["defense"]) for r in rows} == {
        (attack, defense) for attack in ("clean", "badnets") for defense in ["none", *DEFENSES]}
    backdoored = next(r for r in rows if r["attack"] == "badnets" and r["defense"] == "none")
    assert backdoored["asr"] > 0.5  # the quick suite's backdoor is really there
    for r in rows:
        assert 0 <= r["ca"] <= 1 and r["seconds"] >= 0
        assert (r["asr"] is None) == (r["attack"] == "clean")

    table = (out / "benchmarks.md").read_text()
    assert "baerase bench --suite digits --quick" in table
    for label, _ in DEFENSES.values():
        assert f"| {label} |" in table.split("## Where BAERASE loses or fails")[0]
    assert (out / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run reuses every cached row instead of defending again.
    stamps = {p: p.stat().st_mtime_ns for p in (cache / "results").rglob("*.json")}
    assert baerase(["bench", "--suite", "digits", "--quick", "--cache", str(cache), "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (cache / "results").rglob("*.json")} == stamps


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


def row(attack, defense, ca, asr, before_ca=0.9, before_asr=0.95):
    before = {"ca": before_ca, "asr": None if asr is None else before_asr}
    after = {"ca": ca, "asr": asr}
    return {"arch": "small_cnn", "attack": attack, "defense": defense, **after, "before": before,
            "der": defense_effectiveness_rating(before, after)}


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
