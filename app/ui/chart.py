"""The geometry of the per-class score chart on the job page (the template draws it as SVG).

One bar per class: its score, how much smaller than the median class's its smallest working
trigger is (log ratio), less the part a reference model trained on the clean samples shares
(higher is more suspicious; worker/sanitize/detection.py). Flagged classes are drawn apart, and
a dashed line marks the flagging line of the calibration.
"""

from dataclasses import dataclass

WIDTH_PER_CLASS = 44
HEIGHT = 260
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 44, 16, 34, 40


@dataclass(frozen=True)
class Bar:
    label: str  # the class, under the bar
    x: float
    y: float
    width: float
    height: float
    value_y: float  # where the value's label sits
    value: float
    flagged: bool
    description: str  # tooltip: every number of the class


@dataclass(frozen=True)
class Tick:
    y: float
    label: str


@dataclass(frozen=True)
class ScoreChart:
    width: float
    height: float
    plot_left: float
    plot_right: float
    zero_y: float
    label_y: float  # baseline of the class labels, under the plot
    threshold_y: float
    threshold: float
    bars: list[Bar]
    ticks: list[Tick]


def score_chart(class_scores: list[dict], threshold: float, class_names: list[str] | None) -> ScoreChart:
    """``class_scores`` as in report.json (class, family, trigger_size, score, held_out_asr, flagged),
    one bar per class: its most suspicious family."""
    best: dict[int, dict] = {}
    for score in class_scores:
        if score["class"] not in best or score["score"] > best[score["class"]]["score"]:
            best[score["class"]] = score
    class_scores = [best[c] for c in sorted(best)]
    values = [score["score"] for score in class_scores]
    top = max([threshold * 1.25, *values])
    bottom = min([0.0, *values])
    plot_height = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def y_of(value: float) -> float:
        return MARGIN_TOP + (top - value) / (top - bottom) * plot_height

    zero_y = y_of(0.0)
    bars = []
    for i, score in enumerate(class_scores):
        value, index = score["score"], score["class"]
        name = class_names[index] if class_names and index < len(class_names) else str(index)
        y = min(y_of(value), zero_y)
        bars.append(Bar(
            label=name, x=MARGIN_LEFT + i * WIDTH_PER_CLASS + 6, y=y, width=WIDTH_PER_CLASS - 12,
            height=abs(y_of(value) - zero_y), value_y=y - 6, value=value, flagged=score["flagged"],
            description=(f"class {name}: score {value:.2f}, smallest working trigger "
                         f"({score['family']}) has size {score['trigger_size']:.3g} and "
                         f"flips {score['held_out_asr']:.0%} of held-out images"
                         + ("; flagged as a backdoor target" if score["flagged"] else ""))))
    ticks = [Tick(y_of(value), f"{value:g}") for value in sorted({0.0, round(bottom, 1), round(top, 1)})]
    plot_right = MARGIN_LEFT + len(class_scores) * WIDTH_PER_CLASS
    return ScoreChart(width=plot_right + MARGIN_RIGHT, height=HEIGHT, plot_left=MARGIN_LEFT,
                      plot_right=plot_right, zero_y=zero_y,
                      label_y=HEIGHT - MARGIN_BOTTOM + 18, threshold_y=y_of(threshold),
                      threshold=threshold, bars=bars, ticks=ticks)
