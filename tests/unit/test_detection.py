"""Detection: per-family log ratios of the smallest trigger sizes, the reference ratio of triggers
that a clean reference model follows too (beyond what it needs of the family's median class), the calibrated probability, and the frozen copy of the
model that measures them."""

import dataclasses
import math
import statistics

import pytest
import torch

from worker.sanitize.architectures import build_model
from worker.sanitize.config import DetectionConfig
from worker.sanitize.detection import (Calibration, ClassScore, CleanClass, ExcessFit, NormalFit, backdoor_probability,
                                      excesses, log_ratios, reference_line, score_classes, uploaded_probability)
from worker.sanitize.pipeline import Detection, Normalized, by_budget, for_inference, for_search
from worker.sanitize.recovery import BlendFamily, FoundTrigger, MaskFamily, WarpFamily
from worker.sanitize.retuning import KINDS, model_kind

MASK, BLEND = MaskFamily((1, 8, 8)), BlendFamily((1, 8, 8))
CALIBRATION = Calibration(log_ratio_scale={kind: 1.0 for kind in KINDS}, screen_scale={kind: 1.0 for kind in KINDS},
                          scores={"batchnorm": NormalFit(0.5, 2.0, 300), "plain": NormalFit(0.0, 1.0, 300),
                                  "dense": NormalFit(1.0, 1.0, 300)},
                          tests={kind: 1 for kind in KINDS},  # fits of single class scores
                          models={kind: 10 for kind in KINDS}, source="test",
                          retuning={"batchnorm": NormalFit(2.0, 1.0, 30), "plain": NormalFit(0.0, 1.0, 30),
                                    "dense": NormalFit(-1.0, 1.0, 30)})


def found(sizes, family=MASK, asr=0.95):
    return [FoundTrigger(c, family, torch.zeros(family.dim), size, size, True, asr=asr, shifted_asr=asr)
            for c, size in enumerate(sizes)]


def flagged(*per_family, cfg=DetectionConfig()):
    scores = score_classes(list(per_family), CALIBRATION, cfg, "plain")
    return sorted((s.target, s.family) for s in scores if s.flagged)


def test_log_ratio_is_to_the_median_and_one_sided():
    ratios = log_ratios([0.3, 0.3, 0.3, 0.03, 0.6])
    assert ratios[3] == pytest.approx(math.log(10)) and ratios[4] < 0 and ratios[0] == 0


def test_a_small_trigger_is_flagged():
    assert flagged(found([0.3, 0.35, 0.28, 0.002, 0.4, 0.33, 0.31, 0.29, 0.36, 0.3])) == [(3, "mask")]


def test_two_and_three_targets_are_all_flagged():
    assert flagged(found([0.3, 0.002, 0.28, 0.003, 0.4, 0.33, 0.31, 0.29, 0.36, 0.3])) == [(1, "mask"), (3, "mask")]
    three = [0.3, 0.002, 0.28, 0.003, 0.4, 0.33, 0.004, 0.29, 0.36, 0.3]
    assert flagged(found(three)) == [(1, "mask"), (3, "mask"), (6, "mask")]


def test_similar_sizes_flag_nothing_even_with_tiny_spread():
    # A MAD z-score would call 0.29 an outlier among near-identical sizes; the log ratio does not.
    assert flagged(found([0.3, 0.3, 0.3, 0.3, 0.29, 0.3, 0.3, 0.3, 0.3, 0.3])) == []


def test_a_trigger_that_does_not_transfer_to_held_out_images_is_not_flagged():
    triggers = found([0.3, 0.35, 0.28, 0.002, 0.4, 0.33, 0.31, 0.29, 0.36, 0.3])
    triggers[3].asr = 0.3
    assert flagged(triggers) == []


def reference_needs(triggers, times):
    for trigger in triggers:
        trigger.reference_size = times * trigger.size


def test_a_trigger_that_a_clean_reference_model_follows_too_is_natural():
    # A hundred times smaller than the median class, but a reference model that never saw
    # poisoned data needs only twice as much of it beyond what it needs of every class's trigger
    # (three times): a feature of the data, scored log 2.
    triggers = found([0.3, 0.35, 0.28, 0.003, 0.4, 0.3, 0.31, 0.29, 0.36, 0.3])
    reference_needs(triggers, 3)
    triggers[3].reference_size = 0.9  # an implant: the reference needs a hundred times more than of others
    implant = {s.target: s for s in score_classes([triggers], CALIBRATION, DetectionConfig(), "plain")}
    triggers[3].reference_size = 0.018
    natural = {s.target: s for s in score_classes([triggers], CALIBRATION, DetectionConfig(), "plain")}
    assert implant[3].score == pytest.approx(math.log(100)) and implant[3].flagged
    assert implant[3].budget_probability == implant[3].probability  # found by its budget, not its screen
    assert natural[3].score == pytest.approx(math.log(2)) and not natural[3].flagged
    assert natural[3].log_ratio == implant[3].log_ratio


def test_a_model_that_answers_every_trigger_more_readily_than_the_reference_is_not_judged_for_it():
    # A well-trained model's triggers all need 20 times more on the reference: class 3's too.
    triggers = found([0.03, 0.035, 0.028, 0.0003, 0.04, 0.03, 0.031, 0.029, 0.036, 0.03])
    reference_needs(triggers, 20)
    scores = {s.target: s for s in score_classes([triggers], CALIBRATION, DetectionConfig(), "plain")}
    assert scores[3].reference_ratio == pytest.approx(0.0) and scores[3].score == pytest.approx(0.0)
    assert not scores[3].flagged


def test_a_ratio_counts_beyond_the_other_classes_the_reference_follows():
    # A BadNets model's masks: the reference follows four of them (the bag's and the shirt's at the
    # model's own budget, the trouser's at 8 times it, the target's at 160 times) and none of the
    # rest at any size. Those six budgets are the family's whole, a floor, not a ratio: counted as
    # ratios they would set the median above the trouser's and take 3 from the target's.
    triggers = found([0.05, 0.047, 0.04, 0.046, 0.056, 0.001, 0.046, 0.06, 0.013, 0.056])
    for trigger in triggers:
        trigger.reference_size = MASK.whole
    for target, times in ((1, 8), (5, 160), (6, 1), (8, 1)):
        triggers[target].reference_size = times * triggers[target].size
    scores = {s.target: s for s in score_classes([triggers], CALIBRATION, DetectionConfig(), "plain")}
    assert scores[5].reference_ratio == pytest.approx(math.log(160)) and scores[5].flagged  # the others: 8, 1, 1
    assert scores[8].reference_ratio == pytest.approx(-math.log(8)) and not scores[8].flagged  # 8, 160, 1
    # Where the reference follows the target's trigger alone, its ratio stands as it is.
    for target in (1, 6, 8):
        triggers[target].reference_size = MASK.whole
    alone = {s.target: s for s in score_classes([triggers], CALIBRATION, DetectionConfig(), "plain")}
    assert alone[5].reference_ratio == pytest.approx(math.log(160)) and alone[5].flagged


def test_an_ordinary_class_keeps_its_log_ratio_whatever_the_reference_says():
    triggers = found([0.3, 0.35, 0.28, 0.003, 0.4, 0.3, 0.31, 0.29, 0.36, 0.3])
    triggers[4].reference_size = 0.001  # below the median: never a candidate
    scores = {s.target: s for s in score_classes([triggers], CALIBRATION, DetectionConfig(), "plain")}
    assert scores[4].score == scores[4].log_ratio < 0 and scores[4].reference_ratio is not None


def test_blend_factors_are_compared_among_themselves():
    # Class 3's blend factor is tiny among blend factors but larger than every class's mask:
    # ranked with the masks it would pass unnoticed.
    masks = [0.1, 0.12, 0.09, 0.11, 0.1, 0.13, 0.1, 0.12]
    blends = [0.5, 0.55, 0.45, 0.005, 0.5, 0.6, 0.52, 0.48]
    assert flagged(found(masks), found(blends, BLEND)) == [(3, "blend")]


def test_a_trigger_found_far_sooner_than_the_others_is_small_though_its_budget_is_ordinary():
    # Every budget alike, but class 3's search held a trigger a hundred times smaller than the
    # median class's after the first round: a faint whole-image trigger, as a Blended model's.
    triggers = found([0.3, 0.35, 0.28, 0.3, 0.4, 0.33, 0.31, 0.29, 0.36, 0.3])
    for trigger in triggers:
        trigger.screen_size = 0.6
    triggers[3].screen_size = 0.006
    scores = {s.target: s for s in score_classes([triggers], CALIBRATION, DetectionConfig(), "plain")}
    assert scores[3].screen_log_ratio == pytest.approx(math.log(100)) and abs(scores[3].log_ratio) < 0.05
    assert scores[3].score == pytest.approx(math.log(100)) and scores[3].flagged
    # Its budget alone says nothing unusual: the trigger recovered is not known to be the backdoor's.
    assert scores[3].budget_probability < DetectionConfig().suspicious_probability
    # A clean reference model that finds it as easy caps it, as it caps a small budget.
    reference_needs(triggers, 1)
    triggers[3].reference_size = 0.6
    natural = {s.target: s for s in score_classes([triggers], CALIBRATION, DetectionConfig(), "plain")}
    assert natural[3].score == pytest.approx(math.log(2)) and not natural[3].flagged


def clean_classes(*ratios, family="mask"):
    """(log ratio, screen log ratio, reference ratio[, excess]) -> CleanClass rows of one model."""
    return [CleanClass(family, *r) if len(r) == 4 else CleanClass(family, *r, None) for r in ratios]


def test_calibration_fits_each_models_highest_score_per_kind_and_turns_scores_into_a_probability():
    # (log ratio, screen log ratio, reference ratio) of two models' classes: screens spread half as
    # much as log ratios (so no screen counts more than its log ratio), candidates' reference
    # ratios twice as much.
    first = clean_classes((-1.0, -0.5, None), (-0.5, -0.25, None), (0.5, 0.25, 1.0))
    second = clean_classes((1.0, 0.5, 2.0), (1.5, 0.75, 3.0), (2.0, 1.0, 0.5))
    calibration = Calibration.fit({"batchnorm": [first, second], "plain": [first, second[:1]], "dense": [first, second]},
                                  {"batchnorm": [-1, 0, 1, 3], "plain": [-1.0, -0.5], "dense": [-1.0, 0.0]},
                                  source="test")
    assert calibration.screen_scale["batchnorm"] == pytest.approx(2.0)
    assert calibration.log_ratio_scale["batchnorm"] == pytest.approx(2.0)
    # Scores: the log ratio twice, or the reference ratio where smaller: -2, -1, 1 and 2, 3, 0.5;
    # the models' highest, 1 and 3, fitted by the median and the spread above it.
    assert calibration.scores["batchnorm"] == NormalFit(2.0, pytest.approx(1.0), 2)
    assert (calibration.tests["batchnorm"], calibration.models["batchnorm"]) == (3, 2)
    assert calibration.retuning["batchnorm"] == NormalFit(0.5, pytest.approx(math.sqrt((0.25 + 6.25) / 2)), 4)
    assert calibration.retuning["plain"] == NormalFit(-0.75, 0.25, 2)
    # Judged as a model of as many tests, a score is as likely as the fit says; more tests per
    # model make the same score less surprising.
    assert calibration.probability(2.0, 3, "batchnorm") == pytest.approx(0.5)
    assert calibration.probability(2.0, 30, "batchnorm") < calibration.probability(2.0, 3, "batchnorm")
    assert CALIBRATION.probability(3.0, 1, "plain") > CALIBRATION.probability(3.0, 30, "plain")
    assert CALIBRATION.probability(-5.0, 30, "plain") < 1e-6 and CALIBRATION.probability(8.0, 30, "plain") > 0.999
    for kind in KINDS:
        line = CALIBRATION.score_for(0.99, 30, kind)
        assert math.isclose(CALIBRATION.probability(line, 30, kind), 0.99, rel_tol=1e-6)


def test_a_kind_without_calibration_models_keeps_its_fit():
    model = clean_classes((-1.0, -1.0, None), (-0.5, -0.5, None), (0.5, 0.5, 1.0), (1.0, 1.0, 2.0), (1.5, 1.5, 3.0),
                          (2.0, 2.0, 0.5))
    refitted = Calibration.fit({"plain": [model, model[:3]], "batchnorm": []}, {"plain": [-1.0, -0.5], "batchnorm": []},
                               source="test", keep=CALIBRATION)
    assert refitted.log_ratio_scale["plain"] == pytest.approx(2.0) and refitted.models == {"plain": 2, "batchnorm": 10, "dense": 10}
    assert (refitted.scores["batchnorm"], refitted.tests["batchnorm"], refitted.retuning["batchnorm"]) == (
        CALIBRATION.scores["batchnorm"], CALIBRATION.tests["batchnorm"], CALIBRATION.retuning["batchnorm"])
    assert refitted.excess == {"plain": None, "batchnorm": None, "dense": None}  # measured on no class
    with pytest.raises(ValueError, match="batchnorm"):
        Calibration.fit({"plain": [model, model[:3]]}, {"plain": [-1.0]}, source="test")
    kept = Calibration.fit({"plain": [model, model[:3]]}, {"plain": None}, source="test", keep=CALIBRATION)
    assert kept.retuning == CALIBRATION.retuning and kept.scores["plain"] != CALIBRATION.scores["plain"]
    with pytest.raises(ValueError, match="one calibration model of kind plain"):
        Calibration.fit({"plain": [model]}, {"plain": [-1.0]}, source="test", keep=CALIBRATION)


def test_a_class_that_re_learns_faster_than_the_reference_is_dormant_whatever_clean_models_do():
    # CALIBRATION's clean classes re-tune at 0 +- 1 (plain) and 2 +- 1 (BatchNorm) against the
    # reference: lines above 0, so the reference, which never had the trigger, sets the line.
    assert CALIBRATION.dormancy_line(0.8, 1, "plain") == CALIBRATION.dormancy_line(0.8, 1, "batchnorm") == 0.0
    # Clean classes that re-learn far slower than the reference set a stricter line of their own.
    strict = dataclasses.replace(CALIBRATION, retuning={kind: NormalFit(-4.0, 1.0, 12) for kind in KINDS})
    assert strict.dormancy_line(0.8, 1, "plain") == pytest.approx(-4.0 + statistics.NormalDist().inv_cdf(0.8))
    assert strict.dormancy_line(0.8, 3, "plain") > strict.dormancy_line(0.8, 1, "plain")


def test_a_score_is_judged_by_clean_models_of_the_same_kind():
    # BatchNorm models' ordinary classes score higher: what flags a plain CNN is ordinary there.
    sizes = [0.3, 0.35, 0.28, 0.003, 0.4, 0.33, 0.31, 0.29, 0.36, 0.3]  # class 3: log ratio 4.6
    plain, batchnorm = (score_classes([found(sizes)], CALIBRATION, DetectionConfig(), kind)[0]
                        for kind in ("plain", "batchnorm"))
    assert plain.score == batchnorm.score and plain.flagged and not batchnorm.flagged


def test_scores_only_calibration_never_flags():
    triggers = found([0.3, 0.35, 0.28, 1e-5, 0.4, 0.33])
    scores = score_classes([triggers], Calibration.scores_only(), DetectionConfig(), "plain")
    assert not any(s.flagged for s in scores) and backdoor_probability(scores) == 0.0
    assert all(Calibration.scores_only().retuning_probability(100.0, 1, kind) == 0.0 for kind in KINDS)


def test_a_re_tuning_statistic_is_judged_against_as_many_clean_classes_of_its_kind_as_were_checked():
    assert CALIBRATION.retuning_probability(0.0, 1, "plain") == 0.5
    assert CALIBRATION.retuning_probability(2.0, 3, "plain") < CALIBRATION.retuning_probability(2.0, 1, "plain") < 1
    # Models with running statistics re-learn faster: the same statistic is less surprising in them.
    assert CALIBRATION.retuning_probability(2.0, 1, "batchnorm") == 0.5


@pytest.mark.parametrize("arch, kind", [("small_resnet", "batchnorm"), ("small_cnn", "plain"), ("mlp", "dense")])
def test_running_statistics_then_convolutions_set_a_model_kind(arch, kind):
    model = build_model(arch, 10, 1)
    assert model_kind(model) == kind and model_kind(torch.jit.script(model)) == kind


def test_the_reference_is_measured_only_where_it_can_change_a_verdict():
    cfg = DetectionConfig(suspicious_probability=0.8, flag_probability=0.99)
    line = reference_line(CALIBRATION, cfg, families=3, tests=30, kind="plain")
    # A class scored by its log ratio alone just under the line is not suspicious, nor flagged as
    # one of a flagged class's three families: the suspicious line of 30 tests is the lower here.
    assert math.isclose(CALIBRATION.probability(line, 30, "plain"), 0.8, rel_tol=1e-6)
    assert CALIBRATION.probability(line, 3, "plain") < 0.99
    # With a flagging line under the suspicious one, a flagged class's other families are judged
    # at the lowest line: that is the line.
    lower_flag = DetectionConfig(suspicious_probability=0.95, flag_probability=0.9)
    lower = reference_line(CALIBRATION, lower_flag, 3, 30, "plain")
    assert math.isclose(CALIBRATION.probability(lower, 3, "plain"), 0.9, rel_tol=1e-6)
    assert CALIBRATION.probability(lower, 30, "plain") < 0.9
    # Collecting the calibration's own scores measures every candidate.
    assert reference_line(Calibration.scores_only(), cfg, families=3, tests=30, kind="plain") == 0.0


def test_the_shipped_calibration_comes_from_clean_models():
    shipped = Calibration.load()
    assert all(shipped.models[kind] >= 2 for kind in KINDS)
    fits = [shipped.scores[kind] for kind in KINDS] + [shipped.retuning[kind] for kind in KINDS]
    assert all(fit.count >= 3 and fit.std > 0 for fit in fits)


@pytest.mark.parametrize("n", [2, 3])
def test_few_classes_do_not_crash(n):
    assert flagged(found([0.3] * n)) == []


def test_only_flagged_classes_are_unlearnt_and_the_working_suspicious_ones_stay_unresolved():
    def score(target, family, probability, asr=0.9, class_probability=0.5):
        return ClassScore(target, family, 0.01, 2.0, 0.0, None, None, None, 2.0, asr, None, probability, class_probability,
                          flagged=probability >= 0.99 and asr >= 0.5, budget_probability=probability)

    scores = [score(5, "mask", 0.999), score(5, "blend", 0.95), score(2, "mask", 0.978),
              score(9, "mask", 0.978, asr=0.3), score(8, "warp", 0.5)]
    detection = Detection({}, scores, 0.999)
    assert [s.target for s in detection.flagged] == [5]
    # Class 5 once, by its top family; class 2 (above the suspicious line, trigger working) is
    # left for the verdict, not the class whose trigger misses held-out images, nor the ordinary one.
    assert [(s.target, s.family) for s in detection.to_unlearn(DetectionConfig())] == [(5, "mask")]
    assert detection.unresolved(DetectionConfig()) == {2}


def test_a_target_brings_its_other_families_that_are_unusual_for_one_class():
    def score(target, family, probability, class_probability, asr=0.9):
        return ClassScore(target, family, 0.01, 2.0, 0.0, None, None, None, 2.0, asr, None, probability, class_probability,
                          flagged=probability >= 0.99 and asr >= 0.5, budget_probability=probability)

    scores = [score(4, "mask", 0.999, 1.0), score(4, "blend", 0.6, 0.995), score(4, "warp", 0.1, 0.95),
              score(7, "blend", 0.5, 0.995), score(4, "patch", 0.6, 0.995, asr=0.2)]
    detection = Detection({}, scores, 0.999)
    # A SIG-like backdoor: the blend family sees the signal the mask family's patch only samples.
    # Not the warp, above the suspicious line only, not another class that is unusual only among
    # one class's tests, not a family whose trigger misses held-out images.
    assert [(s.target, s.family) for s in detection.to_unlearn(DetectionConfig())] == [(4, "mask"), (4, "blend")]


def test_a_further_round_takes_only_the_classes_flagged_by_their_budget():
    def score(target, family, budget_probability):
        return ClassScore(target, family, 0.01, 2.0, 3.0, None, None, None, 2.0, 0.9, None, 0.999, 1.0,
                          flagged=True, budget_probability=budget_probability)

    # Class 3 is unusually small by its blend budget, so both its families go; class 6 only by how
    # soon its search converged: it would be residual whatever a round did.
    scores = [score(3, "mask", 0.4), score(3, "blend", 0.9), score(6, "mask", 0.5)]
    assert [(s.target, s.family) for s in by_budget(scores, 0.8)] == [(3, "mask"), (3, "blend")]


def test_a_trigger_found_after_unlearning_is_judged_as_on_the_model_as_uploaded():
    family = found([0.3, 0.35, 0.28, 0.3, 0.4, 0.33, 0.31, 0.29, 0.36, 0.3])
    reference_needs(family, 2)  # the first detection's reference sizes: twice every class's
    # As small on the uploaded model as after unlearning, 60 times smaller than on the reference
    # (30 times beyond the family's median).
    missed = uploaded_probability(family, 3, 0.005, 0.3, None, CALIBRATION, "plain", 20)
    # On the uploaded model it needs what the reference needs: unlearning made it.
    made = uploaded_probability(family, 3, 0.3, 0.3, None, CALIBRATION, "plain", 20)
    assert missed > 0.99 and made < 0.01


def test_a_class_probability_counts_only_that_class_tests():
    sizes = [0.3, 0.35, 0.28, 0.05, 0.4, 0.33]
    scores = score_classes([found(sizes), found(sizes, BLEND)], CALIBRATION, DetectionConfig(), "plain")
    for s in scores:
        assert s.class_probability == pytest.approx(CALIBRATION.probability(s.score, 2, "plain"))
        assert s.class_probability >= s.probability


class Unscriptable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 2)
        self.prepare = lambda x: x.flatten(1)  # TorchScript cannot compile a lambda

    def forward(self, x):
        return self.fc(self.prepare(x))


class Viewed(torch.nn.Module):
    """Flattens with ``view``, which a channels-last feature map cannot give."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        x = self.conv(x)
        return self.fc(x.view(x.shape[0], -1))


@pytest.mark.parametrize("copy_for", [for_inference, for_search])
@pytest.mark.parametrize("arch", ["small_cnn", "small_resnet"])
@pytest.mark.parametrize("scripted", [False, True])
def test_the_faster_copies_compute_what_the_model_does_and_leave_it_as_it_was(copy_for, arch, scripted):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, in_channels=1).eval()
    if arch == "small_resnet":  # BatchNorm statistics other than the initial ones, to be folded in
        with torch.no_grad():
            model.train()(torch.rand(64, 1, 28, 28))
            model.eval()
    model = Normalized(torch.jit.script(model) if scripted else model, [0.5], [0.25])
    for p in model.parameters():
        p.requires_grad_(False)  # as the pipeline holds it
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    fast = copy_for(model, torch.rand(8, 1, 28, 28))
    assert fast is not model
    with torch.no_grad():
        for n in (32, 7):  # the passes come in chunks, the last one shorter
            x = torch.rand(n, 1, 28, 28)
            assert torch.allclose(fast(x), model(x), atol=1e-4)
    if copy_for is for_search:  # the searches' gradients, with respect to the images
        x = torch.rand(16, 1, 28, 28)
        grads = []
        for m in (fast, model):
            xx = x.clone().requires_grad_(True)
            m(xx).log_softmax(1)[:, 3].sum().backward()
            grads.append(xx.grad)
        assert torch.allclose(*grads, atol=1e-5)
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items())
    assert all(tensor.is_contiguous() for tensor in model.state_dict().values())
    assert all(p.is_leaf for p in model.parameters())  # still a model that unlearning can train


def test_a_model_whose_copy_cannot_be_made_or_fails_is_used_as_it_is():
    unscriptable = Unscriptable()
    assert for_inference(unscriptable, torch.rand(8, 1, 4, 4)) is unscriptable
    # 16 x 16 images reach the small CNN's adaptive pooling at 4 x 4, which oneDNN cannot pool to 7 x 7.
    small = build_model("small_cnn", num_classes=10, in_channels=1).eval()
    assert for_inference(small, torch.rand(8, 1, 16, 16)) is small
    viewed = Viewed().eval()
    assert for_search(viewed, torch.rand(8, 1, 8, 8)) is viewed


def test_the_excess_is_fitted_per_family_and_counted_as_a_score():
    # Two clean models, two families: blend excesses spread a quarter as much as mask ones.
    first = clean_classes((0.0, 0.0, None, -1.0), (0.5, 0.5, 1.0, 1.0)) + clean_classes(
        (0.0, 0.0, None, -0.25), (0.5, 0.5, 2.0, 0.25), family="blend")
    second = clean_classes((0.0, 0.0, None, 0.0), (1.0, 1.0, 3.0, 2.0)) + clean_classes(
        (0.0, 0.0, None, 0.0), (1.0, 1.0, 4.0, 0.5), family="blend")
    fit = Calibration.fit({kind: [first, second] for kind in KINDS}, {kind: [0.0, 1.0] for kind in KINDS},
                          source="test").excess["plain"]
    # Mask excesses 0.5 and 1.5 above their median 0.5, blend a quarter of those: each model's
    # highest counted in those scales, 1 and 2 mask spreads.
    mask = math.sqrt(1.25)
    assert fit.scales == {"blend": pytest.approx(mask / 4), "mask": pytest.approx(mask)}
    assert fit.highest == NormalFit(pytest.approx(1.5 / mask), pytest.approx(0.5 / mask), 2)
    # Where fitted, a clean model has two chances to show a high score, so the same score is less surprising.
    fitted = dataclasses.replace(CALIBRATION, excess={"plain": ExcessFit({"mask": 0.5}, NormalFit(2.0, 1.0, 10))})
    assert fitted.measures_excess("plain") and not fitted.measures_excess("dense")
    assert fitted.probability(2.0, 30, "plain") == pytest.approx(CALIBRATION.probability(2.0, 30, "plain") ** 2)
    assert fitted.probability(2.0, 30, "dense") == CALIBRATION.probability(2.0, 30, "dense")
    # An excess as far above the clean models' highest as a score above theirs (plain: 0 +- 1).
    assert fitted.excess_score(1.5, "mask", "plain") == pytest.approx(1.0)
    assert fitted.excess_score(1.5, "warp", "plain") == fitted.excess_score(None, "mask", "plain") == -math.inf


def test_a_class_the_model_makes_easier_than_the_reference_makes_it_is_flagged():
    # Class 3's trigger is ordinary among the model's classes, and on the reference the model's
    # trigger needs no more than others' (reference ratio 0), but the reference's own triggers make
    # class 3 the hardest of all: the model alone made it easy.
    triggers = found([0.3, 0.35, 0.28, 0.2, 0.4, 0.33, 0.31, 0.29, 0.36, 0.3])
    reference_needs(triggers, 3)
    own = {"mask": log_ratios([0.3, 0.35, 0.28, 3.0, 0.4, 0.33, 0.31, 0.29, 0.36, 0.3])}
    fitted = dataclasses.replace(CALIBRATION, excess={"plain": ExcessFit({"mask": 0.5}, NormalFit(2.0, 1.0, 10))})
    without = {s.target: s for s in score_classes([triggers], fitted, DetectionConfig(), "plain")}
    judged = {s.target: s for s in score_classes([triggers], fitted, DetectionConfig(), "plain", own)}
    assert without[3].excess is None and not without[3].flagged
    assert judged[3].excess == pytest.approx(log_ratios([t.size for t in triggers])[3] - own["mask"][3])
    assert judged[3].excess > 2.5 and judged[3].flagged
    assert judged[3].budget_probability == judged[3].probability
    assert excesses([1.0, 2.0], None) == [None, None] and excesses([1.0, 2.0], [0.5, 0.5]) == [0.5, 1.5]
    # A trigger found after unlearning, as small on the model as uploaded, counts its excess there too.
    assert (uploaded_probability(triggers, 3, 0.2, None, own["mask"][3], fitted, "plain", 1) > 0.99
            > uploaded_probability(triggers, 3, 0.2, None, None, fitted, "plain", 1))
