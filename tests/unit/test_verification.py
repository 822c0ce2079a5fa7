"""The verdict: a backdoor is reported removed only when a new search from scratch on the
sanitized model finds nothing; a backdoor that survives is reported residual, never removed.

Toy data so that a model trains in seconds: 12 x 12 images of six classes, each a grating of its
own direction and frequency over the whole image (so a natural class needs a large trigger); the
backdoored model also learnt that a white 2 x 2 corner square means class 2.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from worker.sanitize.config import SanitizeConfig
from worker.sanitize.detection import Calibration, ClassScore, ExcessFit, NormalFit
from worker.sanitize.pipeline import Detection, accuracy_change, sanitize, split_side_effects, verdict_reason
from worker.sanitize.recovery import FoundTrigger, MaskFamily, held_out_asr
from worker.sanitize.reference import train_reference
from worker.sanitize.retuning import KINDS, retune
from worker.sanitize.unlearning import Check, UnlearningResult

K, SIDE, TARGET = 6, 12, 2
# The verdict logic given a calibration; the shipped one is fitted on the bench population's
# Fashion-MNIST and CIFAR-10 models, not on six toy classes.
TOY_CALIBRATION = Calibration(log_ratio_scale={kind: 1.0 for kind in KINDS}, screen_scale={kind: 1.0 for kind in KINDS},
                              scores={kind: NormalFit(0.0, 0.5, 0) for kind in KINDS},
                              tests={kind: 1 for kind in KINDS}, models={kind: 0 for kind in KINDS}, source="toy",
                              retuning={kind: NormalFit(1.0, 1.0, 0) for kind in KINDS})
SMALL = {"recovery": {"screen_steps": 20, "refine_steps": 60, "generator_steps": 20, "families": ["mask", "blend"]},
         "unlearning": {"epochs": 3}}


def toy_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    rows, cols = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    waves = [(1, 0), (0, 1), (1, 1), (2, 0), (0, 2), (1, -1)]  # cycles per image down and across
    gratings = torch.stack([0.5 + 0.5 * torch.sin(2 * torch.pi * (a * rows + b * cols) / SIDE)
                            for a, b in waves])
    x = 0.6 * gratings[y].unsqueeze(1) + 0.4 * torch.rand(n, 1, SIDE, SIDE, generator=g)
    return x, y


def stamp(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[..., -3:-1, -3:-1] = 1.0
    return x


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 6 * 6, K)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


def train(backdoored: bool) -> nn.Module:
    torch.manual_seed(0)
    x, y = toy_images(3000, seed=1)
    if backdoored:
        x[:300], y[:300] = stamp(x[:300]), TARGET
    model = Toy()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(6):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def attack_success(model, x, y) -> float:
    with torch.no_grad():
        keep = y != TARGET
        return (model(stamp(x[keep])).argmax(1) == TARGET).float().mean().item()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    paths = {}
    for name, backdoored in (("clean", False), ("backdoored", True)):
        paths[name] = root / f"{name}.pt"
        torch.jit.save(torch.jit.script(train(backdoored)), str(paths[name]))
    x, y = toy_images(600, seed=2)
    np.savez(root / "samples.npz", x=(x[:, 0] * 255).round().byte().numpy(), y=y.numpy())
    paths["samples"] = root / "samples.npz"
    return paths


def run(files, name, tmp_path, calibration=TOY_CALIBRATION, **options):
    config = SanitizeConfig(seed=0, **{**SMALL, **options})
    report = sanitize(files[name], files["samples"], tmp_path, config, calibration=calibration)
    assert json.loads((tmp_path / "report.json").read_text())["verdict"] == report["verdict"]
    return report


def test_a_backdoor_that_unlearning_erases_is_reported_removed(files, tmp_path):
    x, y = toy_images(1000, seed=3)
    assert attack_success(torch.jit.load(str(files["backdoored"])), x, y) > 0.9
    report = run(files, "backdoored", tmp_path)
    assert report["verdict"] == "removed" and TARGET in report["detected_targets"]
    assert report["verification"]["backdoor_probability"] < SanitizeConfig().detection.suspicious_probability
    assert report["model_file"] == "backdoored.sanitized.pt"
    # Judged among one class's families, a score is never less likely than among every class's.
    assert all(s["class_probability"] >= s["probability"] for s in report["class_scores"])
    assert attack_success(torch.jit.load(str(tmp_path / "backdoored.sanitized.pt")), x, y) < 0.1
    accuracy = report["clean_accuracy"]
    assert accuracy["images"] > 0 and 1.96 / accuracy["images"] <= accuracy["margin"] < 1
    # The same split, class by class: its images, and its accuracy as their weighted mean.
    classes = report["class_accuracy"]
    assert [c["class"] for c in classes] == list(range(report["num_classes"]))
    assert sum(c["images"] for c in classes) == accuracy["images"]
    for when in ("before", "after"):
        assert sum(c[when] * c["images"] for c in classes) == pytest.approx(accuracy[when] * accuracy["images"])
    # Re-tuned with its recovered trigger, the unlearnt class learns it back no faster than the reference
    # and clean models do.
    [retuning] = report["verification"]["retuning"]
    assert retuning["class"] == TARGET and retuning["retuned_asr"] < 0.1 and retuning["probability"] < 0.8
    assert retuning["kind"] == "plain"  # judged against clean models without running statistics
    assert retuning["statistic"] <= report["verification"]["dormancy_line"] <= 0


def test_the_reference_s_own_triggers_are_searched_once_and_judge_every_class(files, tmp_path):
    # Where the kind's calibration has the excess, every class of the first detection and of the
    # verification is measured against the reference's own triggers, searched once for both.
    fitted = dataclasses.replace(TOY_CALIBRATION, excess={
        kind: ExcessFit({"mask": 1.0, "blend": 1.0}, NormalFit(0.0, 1.0, 0)) for kind in KINDS})
    messages, fractions = [], []

    def progress(stage, fraction, message):
        messages.append(message)
        fractions.append(fraction if stage == "recovery" else None)

    report = sanitize(files["backdoored"], files["samples"], tmp_path, SanitizeConfig(seed=0, **SMALL),
                      progress=progress, calibration=fitted)
    assert report["verdict"] == "removed" and report["detected_targets"] == [TARGET]
    rows = report["class_scores"] + report["verification"]["class_scores"]
    assert all(row["excess"] is not None for row in rows)
    # The backdoor makes its target far easier to reach than the clean samples alone make it.
    mask = [row for row in report["class_scores"] if row["family"] == "mask"]
    assert max(mask, key=lambda row: row["excess"])["class"] == TARGET
    searched = [m.split(" triggers")[0] for m in messages if "reference model's own" in m]
    assert list(dict.fromkeys(searched)) == ["the reference model's own mask", "the reference model's own blend"]
    # Once: the steps of each family's search count up once, not again in the verification.
    mask_steps = [m for m in messages if "own mask" in m]
    assert len(mask_steps) == len(set(mask_steps))
    # The recovery's bar moves on through it, and never back.
    recovery = [f for f in fractions if f is not None]
    assert recovery == sorted(recovery)
    own = [f for f, m in zip(fractions, messages) if "reference model's own" in m]
    assert own[-1] > own[0] > min(recovery)


def test_a_backdoor_that_comes_back_when_re_tuned_is_reported_residual(files, tmp_path):
    # A calibration whose clean models never re-tune at all: any re-tuning counts as a dormant backdoor.
    never_retuned = dataclasses.replace(TOY_CALIBRATION, retuning={kind: NormalFit(-100.0, 1e-3, 0) for kind in KINDS})
    report = run(files, "backdoored", tmp_path, calibration=never_retuned)
    assert report["verdict"] == "residual" and report["residual_targets"] == [TARGET]
    assert "dormant, not gone" in report["verdict_reason"] and "may survive" in report["verdict_reason"]
    assert report["model_changed"] and report["verification"]["retuning"][0]["probability"] == 1.0


def test_the_re_tuning_check_tells_a_dormant_backdoor_from_none():
    """A backdoor unlearnt on the surface only (its trigger stamped on a few batches labelled
    right, until it flips almost nothing) comes back when re-tuned with a few triggered images;
    the same trigger taught the same way to a model that never had it stays at nothing."""
    backdoored, clean = train(backdoored=True), train(backdoored=False)
    x, y = toy_images(2000, seed=5)
    x_hold, y_hold = toy_images(1000, seed=6)
    square = torch.zeros(1, SIDE, SIDE)
    square[..., -3:-1, -3:-1] = 1.0  # the mask family's raw parameters are logits: +-10 is 0 or 1
    raw = torch.cat([(square * 20 - 10).flatten(), torch.full((SIDE * SIDE,), 10.0)])
    trigger = FoundTrigger(TARGET, MaskFamily((1, SIDE, SIDE)), raw, 4 / SIDE ** 2, 4 / SIDE ** 2, worked=True)
    assert held_out_asr(backdoored, trigger, x_hold, y_hold) == 1.0

    optimizer = torch.optim.SGD(backdoored.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    while held_out_asr(backdoored.eval(), trigger, x_hold, y_hold) > 0.03:
        idx = torch.randint(0, len(x), (64,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(backdoored.train()(torch.cat([x[idx], stamp(x[idx])])), torch.cat([y[idx], y[idx]])).backward()
        optimizer.step()

    reference = train_reference(x, y, K, epochs=10, seed=0, arch="small_cnn")
    dormant = retune(backdoored.eval(), reference, trigger, x, y, x_hold, y_hold, seed=0)
    never_there = retune(clean, reference, trigger, x, y, x_hold, y_hold, seed=0)
    assert dormant.asr <= 0.03 and dormant.retuned_asr > 0.5 and dormant.reference_asr < 0.05
    assert never_there.retuned_asr < 0.05 and never_there.statistic < 1 < 5 < dormant.statistic


def test_a_backdoor_that_survives_is_reported_residual_never_removed(files, tmp_path):
    report = run(files, "backdoored", tmp_path, unlearning={"epochs": 0, "rounds": 1})
    assert report["verdict"] == "residual" and TARGET in report["residual_targets"]
    assert "may survive" in report["verdict_reason"]
    # No unlearning epoch was kept, so the model comes back as it was, byte for byte.
    assert "unlearning kept no epoch" in report["verdict_reason"] and not report["model_changed"]
    assert (tmp_path / "backdoored.sanitized.pt").read_bytes() == files["backdoored"].read_bytes()
    accuracy = report["clean_accuracy"]
    assert accuracy["before"] == accuracy["after"] and accuracy["margin"] == pytest.approx(1.96 / accuracy["images"])


def test_unlearning_whose_every_epoch_rolled_back_is_residual_for_every_flagged_class():
    score = ClassScore(TARGET, "mask", 0.01, 2.0, 0.0, None, None, None, 2.0, 0.9, None, 0.999, 1.0, flagged=True,
                       budget_probability=0.999)
    nothing_found = Detection({}, [], 0.0)
    start = Check(epoch=0, clean_accuracy=0.9, recovered_asr={TARGET: 1.0})
    rolled_back = UnlearningResult(before=start, after=start, epochs_run=0, steps=90, rollbacks=9)
    reason = verdict_reason("residual", Detection({}, [score], 0.999), nothing_found, [TARGET], [], [], [], [], [],
                            [rolled_back], SanitizeConfig())
    assert "unlearning kept no epoch" in reason and "9 rolled back" in reason and "may survive" in reason


def test_a_class_above_the_suspicious_line_that_was_not_unlearnt_is_residual():
    start = Check(epoch=0, clean_accuracy=0.9, recovered_asr={TARGET: 1.0})
    kept = UnlearningResult(before=start, after=Check(1, 0.9, {TARGET: 0.0}), epochs_run=1, steps=90, rollbacks=0)
    reason = verdict_reason("residual", Detection({}, [], 0.999), Detection({}, [], 0.1), [TARGET], [], [], [4], [], [],
                            [kept], SanitizeConfig())
    assert "class(es) [4], above the suspicious line" in reason and "not unlearnt" in reason
    assert "new trigger search" not in reason and "may survive" in reason


class PixelToClass3(nn.Module):
    """Four classes; class 0 unless the top-left pixel is bright and ``weak``: then class 3."""

    def __init__(self, weak: bool):
        super().__init__()
        self.weak = weak

    def forward(self, x):
        bright = 50 * x[:, 0, 0, 0] - 20 if self.weak else torch.full_like(x[:, 0, 0, 0], -20.0)
        others = torch.zeros(len(x), 3)
        others[:, 0] = 1
        return torch.cat([others, bright[:, None]], 1)


def test_a_further_round_leaves_alone_a_class_whose_new_trigger_was_not_there_before():
    family = MaskFamily((1, 4, 4))
    raw = torch.full((family.dim,), 10.0)
    raw[1:family.mask_dim] = -10  # the top-left pixel, white
    after = FoundTrigger(3, family, raw, 1 / 16, 1 / 16, True, asr=1.0, reference_size=1.0)
    first = {(c, "mask"): FoundTrigger(c, family, raw, 0.5, 0.5, True) for c in range(4)}
    score = ClassScore(3, "mask", 1 / 16, 2.0, 2.0, 0.0, 2.8, None, 2.0, 1.0, 1.0, 0.99, 1.0, flagged=True,
                       budget_probability=0.99)
    detection, verification = Detection(first, [score] * 4, 0.5), Detection({(3, "mask"): after}, [score], 0.99)
    x, y = torch.rand(64, 1, 4, 4) * 0.3, torch.arange(64) % 4
    x[:, 0, 0, 0] = 0
    calibration = dataclasses.replace(TOY_CALIBRATION, scores={kind: NormalFit(0.0, 1.0, 0) for kind in KINDS})

    def split(uploaded, unlearnt=frozenset()):
        return split_side_effects([score], set(unlearnt), verification, detection, uploaded, x, y, calibration,
                                  SanitizeConfig().detection, "plain", None)

    # The uploaded model answers to the pixel too: a backdoor the first detection missed.
    assert split(PixelToClass3(weak=True)) == ([score], [])
    # It does not: unlearning made the weakness.
    assert split(PixelToClass3(weak=False)) == ([], [3])
    # A class unlearnt already goes again, whatever the uploaded model does.
    assert split(PixelToClass3(weak=False), {3}) == ([score], [])


def test_a_class_flagged_by_its_screen_alone_is_residual_whatever_the_checks_after_find(files, tmp_path):
    # Scores led by the screen (counted a hundred times), budgets counted a tenth: the flagged
    # classes' recovered triggers are not unusually small by themselves. Unlearning them erases
    # them, and the checks after reach only them, so the backdoor's own trigger may survive.
    screen_led = dataclasses.replace(TOY_CALIBRATION, log_ratio_scale={kind: 0.1 for kind in KINDS},
                                     screen_scale={kind: 100.0 for kind in KINDS})
    report = run(files, "backdoored", tmp_path, calibration=screen_led)
    flagged = [s for s in report["class_scores"] if s["flagged"]]
    assert flagged and all(s["budget_probability"] < s["probability"] for s in flagged)
    assert report["verdict"] == "residual" and set(report["detected_targets"]) <= set(report["residual_targets"])
    assert "how soon their trigger search converged" in report["verdict_reason"]
    assert "may survive" in report["verdict_reason"]


def test_the_accuracy_change_is_reported_with_a_margin_from_the_images_that_changed():
    before = torch.tensor([True] * 150 + [False] * 50)
    unchanged = accuracy_change(before, before)
    assert unchanged.before == unchanged.after == 0.75 and unchanged.images == 200
    assert unchanged.margin == pytest.approx(1.96 / 200)  # none changed: the split's resolution
    after = before.clone()
    after[:10], after[150:160] = False, True  # 10 images lost, 10 gained: no change, but noise
    swapped = accuracy_change(before, after)
    assert swapped.after == swapped.before and swapped.margin == pytest.approx(1.96 * 21 ** 0.5 / 200)


def test_a_clean_model_comes_back_byte_for_byte(files, tmp_path):
    report = run(files, "clean", tmp_path)
    assert report["verdict"] == "clean" and not report["model_changed"]
    assert (tmp_path / "clean.sanitized.pt").read_bytes() == files["clean"].read_bytes()
