"""Which classes are backdoor targets: a calibrated score per class and trigger family, not
hand-set floors. A class's score is the smaller of its log ratio (how much smaller its trigger is
than the median class's) and its reference ratio (how much more of the same trigger a reference
model trained on the clean samples alone needs); ``calibration.json``, fitted on clean
calibration models only, turns the highest score into ``backdoor_probability``.
docs/method.md, section 3, explains each part and the measurements behind it.
"""

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .config import DetectionConfig
from .recovery import FoundTrigger
from .retuning import KINDS

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")


@dataclass(frozen=True)
class NormalFit:
    """A normal fit of clean models' values (``upper_normal``) and how many values it took."""

    mean: float
    std: float
    count: int

    @classmethod
    def of(cls, values: list[float]) -> "NormalFit":
        return cls(*upper_normal(values), len(values))

    def below(self, value: float) -> float:
        """Chance that one clean value is below ``value``."""
        return normal_cdf(value, self.mean, self.std)


@dataclass(frozen=True)
class Calibration:
    mean: float  # of the class scores (a normal fit, ``fit``)
    std: float
    models: int  # clean calibration models it was fitted on
    source: str
    # The re-tuning statistic (retuning.py) of the same models' classes, unlearnt as if targets,
    # fitted apart for each model kind (retuning.KINDS).
    retuning: dict[str, NormalFit]

    @classmethod
    def load(cls, path: Path = CALIBRATION_FILE) -> "Calibration":
        fields = json.loads(path.read_text())
        return cls(**{**fields, "retuning": {kind: NormalFit(**fit) for kind, fit in fields["retuning"].items()}})

    @classmethod
    def fit(cls, scores: list[float], retuning: dict[str, list[float]], models: int, source: str) -> "Calibration":
        return cls(*upper_normal(scores), models, source, {kind: NormalFit.of(retuning[kind]) for kind in KINDS})

    @classmethod
    def scores_only(cls) -> "Calibration":
        """A calibration under which nothing is ever flagged, and nothing re-tuned counts as
        dormant: for collecting the calibration models' own scores."""
        return cls(math.inf, 1.0, 0, "scores only", never_dormant())

    @property
    def collects_scores(self) -> bool:
        return math.isinf(self.mean)

    def probability(self, score: float, tests: int) -> float:
        """Chance that a clean model with ``tests`` scores shows none as high as this one."""
        return normal_cdf(score, self.mean, self.std) ** tests

    def retuning_probability(self, statistic: float, tests: int, kind: str) -> float:
        """Chance that ``tests`` unlearnt classes of clean models of this kind all re-tune less than this."""
        return self.retuning[kind].below(statistic) ** tests

    def score_for(self, probability: float, tests: int) -> float:
        """The score whose probability is ``probability`` (the flagging line of the chart)."""
        return self.mean + self.std * statistics.NormalDist().inv_cdf(probability ** (1 / tests))


def never_dormant() -> dict[str, NormalFit]:
    """A re-tuning line that no statistic reaches, for every kind."""
    return {kind: NormalFit(math.inf, 1.0, 0) for kind in KINDS}


def upper_normal(values: list[float]) -> tuple[float, float]:
    """(mean, std) of a normal fit whose spread is taken from the upper half only (the root mean
    square of the values above the median): flags live in the upper tail, and a heavy upper tail
    must widen the fit rather than be averaged away by the lower half."""
    median = statistics.median(values)
    upper = [v - median for v in values if v > median]
    return median, math.sqrt(statistics.fmean(d * d for d in upper))


def normal_cdf(value: float, mean: float, std: float) -> float:
    return 0.5 * (1 + math.erf((value - mean) / (std * math.sqrt(2))))


@dataclass
class ClassScore:
    target: int
    family: str
    size: float
    log_ratio: float  # log(median class's size / this size), in its family
    transfer_asr: float | None  # held-out ASR of the same trigger on the reference model, as it is; None: not a candidate
    reference_ratio: float | None  # log(its budget on the reference / its budget here); None: not a candidate
    score: float  # min(log_ratio, reference_ratio): what the calibration judges
    asr: float  # held-out
    shifted_asr: float | None  # None: not a candidate
    probability: float  # against every class and family of a clean model: how a model is judged
    # Against one class's families only: how a class already known to be a target is judged
    # (its other families are then a few planned tests, not a search over every class).
    class_probability: float
    flagged: bool


def log_ratios(found: list[FoundTrigger]) -> list[float]:
    """One family's triggers, one per class -> how much smaller than the median class's each is,
    in log units (a failed search counts as the family's ``whole`` size)."""
    logs = [math.log(max(t.size, 1e-6)) for t in found]
    median = statistics.median(logs)
    return [median - v for v in logs]


def reference_ratio(trigger: FoundTrigger) -> float | None:
    """log(budget on the reference / budget on the model), where the reference was measured."""
    if trigger.reference_size is None:
        return None
    return math.log(max(trigger.reference_size, 1e-6) / max(trigger.size, 1e-6))


def reference_line(calibration: Calibration, cfg: DetectionConfig, tests: int) -> float:
    """The log ratio above which a class's reference ratio is measured. A class's score is at
    most its log ratio, so below the suspicious line (or the flagging line, if lower) the
    reference cannot change a verdict, and the log ratio stands as its score. Collecting the
    calibration's own scores measures every candidate (log ratio > 0): the fit needs true scores."""
    if calibration.collects_scores:
        return 0.0
    probability = min(cfg.suspicious_probability, cfg.flag_probability)
    return max(0.0, calibration.score_for(probability, tests))


def class_score(log_ratio: float, ratio: float | None) -> float:
    return log_ratio if ratio is None or log_ratio <= 0 else min(log_ratio, ratio)


def score_classes(per_family: list[list[FoundTrigger]], calibration: Calibration,
                  cfg: DetectionConfig) -> list[ClassScore]:
    """per_family[f][c]: class c's trigger in family f, with its held-out and transfer ASRs
    filled in. Returns every (class, family) score, the most suspicious first."""
    tests = sum(len(found) for found in per_family)
    scores = []
    for found in per_family:
        for trigger, log_ratio in zip(found, log_ratios(found)):
            ratio = reference_ratio(trigger)
            score = class_score(log_ratio, ratio)
            probability = calibration.probability(score, tests)
            scores.append(ClassScore(
                trigger.target, trigger.family.name, trigger.size, log_ratio, trigger.transfer_asr, ratio, score,
                trigger.asr, trigger.shifted_asr, probability, calibration.probability(score, len(per_family)),
                flagged=probability >= cfg.flag_probability and trigger.asr >= cfg.min_held_out_asr,
            ))
    return sorted(scores, key=lambda s: -s.score)


def backdoor_probability(scores: list[ClassScore]) -> float:
    return max((s.probability for s in scores), default=0.0)
