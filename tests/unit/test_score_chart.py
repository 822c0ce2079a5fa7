"""The job page's score chart, for reports of this engine and of the one before detection scores."""

from app.ui.chart import score_chart
from worker.sanitize.report import with_scores

ROW = {"class": 0, "family": "mask", "trigger_size": 0.01, "held_out_asr": 0.9, "flagged": False}


def test_a_report_with_scores_is_charted_by_score():
    report = {"flag_score": 2.8, "class_scores": [ROW | {"log_ratio": 2.0, "transfer_asr": 0.5, "score": 1.3},
                                                  ROW | {"class": 1, "log_ratio": 0.1, "transfer_asr": 0.0, "score": 0.1}]}
    chart = score_chart(with_scores(report)["class_scores"], with_scores(report)["flag_score"], None)
    assert [bar.value for bar in chart.bars] == [1.3, 0.1] and chart.threshold == 2.8


def test_a_report_stored_before_scores_still_gets_its_chart():
    old = {"flag_log_ratio": 3.9, "class_scores": [ROW | {"log_ratio": 2.0}, ROW | {"class": 1, "log_ratio": 0.1}]}
    report = with_scores(old)
    chart = score_chart(report["class_scores"], report["flag_score"], ["a", "b"])
    assert [bar.value for bar in chart.bars] == [2.0, 0.1] and chart.threshold == 3.9
    assert report["class_scores"][0]["transfer_asr"] is None and report["class_scores"][0]["log_ratio"] == 2.0
