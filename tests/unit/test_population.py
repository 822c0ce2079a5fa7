"""The arithmetic of the population's detection tables (bench/population.py)."""

import dataclasses

from bench.population import most_suspicious, roc_auc_line, summary
from worker.sanitize.detection import Calibration, ExcessFit, NormalFit


def test_roc_auc_ranks_implanted_backdoors_against_clean_models_only():
    # (implanted, statistic): True a backdoor that implanted, False one that did not, None clean.
    models = [(True, 0.9), (True, 0.4), (None, 0.5), (None, 0.1), (False, 0.0)]
    line = roc_auc_line(models, "the statistic")
    # 0.9 beats both clean models, 0.4 beats one: 3 of 4 pairs; the failed attack is left out.
    assert line == "Detection ROC-AUC of the statistic: 0.750 (2 backdoored, 2 clean evaluation models)"
    assert roc_auc_line([(True, 1.0), (True, 1.0)], "x").startswith("Detection ROC-AUC of x: n/a")


def test_a_tie_counts_half():
    assert "0.500" in roc_auc_line([(True, 0.3), (None, 0.3)], "x")


def test_the_summary_puts_the_clean_models_asr_of_the_same_trigger_beside_the_result():
    report = {"verdict": "removed", "backdoor_probability": 1.0, "timings_s": {"total": 90.0}}
    row = {"key": "fmnist-small_cnn-badnets-s32", "backdoored": True, "report": report, "cost": 60.0,
           "before": {"ca": 0.87, "asr": 0.99}, "after": {"ca": 0.865, "asr": 0.039}, "clean_model_asr": 0.044}
    line = summary([row]).splitlines()[2]
    assert "| 99.0% -> 3.9% | 4.4% |" in line
    clean = {**row, "backdoored": False, "before": {"ca": 0.9, "asr": None}, "after": {"ca": 0.9, "asr": None},
             "clean_model_asr": None}
    assert "| - | - |" in summary([clean]).splitlines()[2]


def test_neural_cleanses_detection_sits_beside_ours_when_every_row_holds_it():
    report = {"verdict": "clean", "backdoor_probability": 0.1, "timings_s": {"total": 60.0}}
    clean = {"key": "clean", "backdoored": False, "report": report, "cost": 30.0, "before": {"ca": 0.9, "asr": None},
             "after": {"ca": 0.9, "asr": None}, "neural_cleanse": {"anomaly_index": 2.5, "flagged": [8]}}
    backdoored = {**clean, "key": "badnets", "backdoored": True, "before": {"ca": 0.9, "asr": 0.99},
                  "after": {"ca": 0.9, "asr": 0.01}, "report": {**report, "backdoor_probability": 1.0},
                  "neural_cleanse": {"anomaly_index": 1.5, "flagged": []}}
    table = summary([clean, backdoored])
    assert "| 2.50 | 8 |" in table and "| 1.50 | none |" in table
    assert "ROC-AUC of backdoor_probability: 1.000" in table
    assert "ROC-AUC of Neural Cleanse's anomaly index: 0.000" in table


def test_cached_scores_are_judged_at_the_calibrations_scales():
    # Cached at scales 1: class 3 led (min(1.0, 0.9) = 0.9 against 0.8), but at log ratio scale 2
    # class 3's reference ratio caps it at 0.9 and class 5's log ratio counts 1.6; class 7's budget
    # is ordinary, and its screen log ratio counts as much as a log ratio of 0.5 x 1.2.
    cached = [{"class": 3, "log_ratio": 1.0, "screen_log_ratio": 0.0, "reference_ratio": 0.9, "score": 0.9},
              {"class": 5, "log_ratio": 0.8, "screen_log_ratio": 0.0, "reference_ratio": None, "score": 0.8},
              {"class": 7, "log_ratio": 0.1, "screen_log_ratio": 1.2, "reference_ratio": None, "score": 1.2}]
    cached = [{**row, "family": "mask", "excess": 0.5} for row in cached]
    fit = {kind: NormalFit(0.0, 0.5, 10) for kind in ("plain", "batchnorm")}
    tests, models = {"plain": 1, "batchnorm": 1}, {"plain": 1, "batchnorm": 1}
    calibration = Calibration({"plain": 2.0, "batchnorm": 1.0}, {"plain": 0.5, "batchnorm": 1.0}, fit, tests, models, "test", fit)
    top, probability = most_suspicious(cached, calibration, "plain")
    assert (top["class"], top["score"]) == (5, 1.6)
    assert probability == calibration.probability(1.6, 3, "plain")
    # Where screens spread as little as log ratios, class 7's screen counts 1.2, twice: 2.4.
    calibration = Calibration({"plain": 2.0, "batchnorm": 1.0}, {"plain": 1.0, "batchnorm": 1.0}, fit, tests, models, "test", fit)
    top, _ = most_suspicious(cached, calibration, "plain")
    assert (top["class"], top["score"]) == (7, 2.4)
    # Where the excess is fitted, a class far easier on the model than on the reference leads: an
    # excess of 3 is six of the fit's spreads above its highest excesses' centre, a score of 3.
    cached[0]["excess"] = 3.0
    fitted = dataclasses.replace(calibration, excess={"plain": ExcessFit({"mask": 0.5}, NormalFit(0.0, 1.0, 10))})
    top, probability = most_suspicious(cached, fitted, "plain")
    assert (top["class"], top["score"]) == (3, 3.0) and probability == fitted.probability(3.0, 3, "plain")
