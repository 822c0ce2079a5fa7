import math

import pytest

from worker.sanitize.config import DetectionConfig
from worker.sanitize.detection import anomaly_indices, detect_targets
from worker.sanitize.recovery import BlendFamily, MaskFamily, PatchFamily, RecoveredTrigger

MASK, PATCH, BLEND = MaskFamily((1, 8, 8)), PatchFamily((1, 8, 8), 3), BlendFamily((1, 8, 8))


def result(target, size, asr, family=MASK):
    return RecoveredTrigger(target, family, generator=None, asr=asr, size=size, penalty=1.0)


def flagged(sizes, asrs=None, cfg=DetectionConfig()):
    asrs = asrs or [0.95] * len(sizes)
    scores = detect_targets([[result(c, s, a)] for c, (s, a) in enumerate(zip(sizes, asrs))], cfg)
    return [s.target for s in scores if s.flagged]


def test_anomaly_index_is_robust_and_one_sided():
    indices = anomaly_indices([1.0, 1.1, 0.9, 1.0, -3.0, 5.0])
    assert indices[4] > 10 and indices[5] < 0


def test_a_small_trigger_is_flagged():
    assert flagged([0.3, 0.35, 0.28, 0.02, 0.4, 0.33, 0.31, 0.29, 0.36, 0.3]) == [3]


def test_two_targets_are_both_flagged():
    assert flagged([0.3, 0.02, 0.28, 0.03, 0.4, 0.33, 0.31, 0.29, 0.36, 0.3]) == [1, 3]


def test_similar_sizes_flag_nothing_even_with_tiny_spread():
    # MAD alone would call 0.29 an outlier among near-identical sizes; the ratio floor does not.
    assert flagged([0.3, 0.3, 0.3, 0.3, 0.29, 0.3, 0.3, 0.3, 0.3, 0.3]) == []


def test_a_trigger_that_does_not_work_is_not_a_backdoor():
    sizes = [0.3, 0.35, 0.28, 0.02, 0.4, 0.33, 0.31, 0.29, 0.36, 0.3]
    assert flagged(sizes, asrs=[0.95] * 3 + [0.1] + [0.95] * 6) == []


def test_best_family_is_the_smallest_that_works():
    per_class = [[result(c, 0.3, 0.95), result(c, 0.035, 0.0, PATCH)] for c in range(6)]
    per_class[4][1].asr = 0.97  # a position-independent patch reaches class 4
    scores = detect_targets(per_class, DetectionConfig())
    assert [s.target for s in scores if s.flagged] == [4]
    assert scores[4].family == "patch"
    assert {s.family for s in scores if s.target != 4} == {"mask"}


def test_blend_factors_are_compared_among_themselves():
    # Class 3's blend factor is tiny among blend factors, but larger than every class's mask:
    # ranked with the masks it would pass unnoticed.
    masks = [0.1, 0.12, 0.09, 0.11, 0.1, 0.13, 0.1, 0.12]
    blends = [0.5, 0.55, 0.45, 0.06, 0.5, 0.6, 0.52, 0.48]
    per_class = [[result(c, m, 0.95), result(c, b, 0.95, BLEND)]
                 for c, (m, b) in enumerate(zip(masks, blends))]
    scores = detect_targets(per_class, DetectionConfig())
    assert [s.target for s in scores if s.flagged] == [3]
    assert scores[3].family == "blend" and math.isclose(scores[3].size, 0.06)


def test_a_class_flagged_on_any_scale_is_a_target():
    masks = [0.3, 0.35, 0.02, 0.3, 0.4, 0.33, 0.31, 0.29]
    blends = [0.5, 0.55, 0.45, 0.06, 0.5, 0.6, 0.52, 0.48]
    per_class = [[result(c, m, 0.95), result(c, b, 0.95, BLEND)]
                 for c, (m, b) in enumerate(zip(masks, blends))]
    scores = detect_targets(per_class, DetectionConfig())
    assert [(s.target, s.family) for s in scores if s.flagged] == [(2, "mask"), (3, "blend")]


@pytest.mark.parametrize("n", [2, 3])
def test_few_classes_do_not_crash(n):
    assert flagged([0.3] * n) == []
