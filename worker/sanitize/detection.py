"""Which classes are backdoor targets: a calibrated score per class, not hand-set floors.

A backdoor target needs far less trigger than any natural class to flip most images. Within each
family (each measures size on its own scale) every class gets its log ratio: the median class's
log trigger size minus its own (2.3 = ten times smaller than the median class). The median is
over all classes, so two or three targets among ten still leave it to the clean classes.

Some classes are small by nature (Fashion-MNIST's "bag" needs about as few pixels as a weak
BadNets square), and no size statistic of the model alone tells them apart. What does is a model
that never saw poisoned data: the reference, trained on the clean samples alone (reference.py).
Each candidate trigger is sized again on it, in its own shape (``recovery.budget``), and its
reference ratio is log(reference budget / model's budget): how many times more of the same
trigger a clean model of the data needs. A natural trigger is a feature of the data, so the
reference needs only a few times more of it (measured: "bag" 1.3-2.0 in log units, even on
ResNets whose bag trigger is tiny and transfers at its own size to 3-5% of images); an implant
means nothing to the reference (4.5-5.6 for BadNets-style squares, 3.0 for a WaNet warp).

A class's **score** is the smaller of the two: its log ratio (small among this model's classes)
and its reference ratio (small only for this model). An implant is both; a natural class fails
the second, an ordinary class the first. A class at or below the median (log ratio <= 0) is
never a candidate and keeps its log ratio, so the reference sizes only the upper half.

Why not Neural Cleanse's MAD z-score: dividing by the spread of the other classes' sizes made the
same backdoor score 2.7 on one model and 7.1 on another, while a clean model's natural class
scored 7.5 where every other class was alike. The spread that matters is that of clean models'
scores, and that is what the calibration measures.

How large a score a clean model shows by chance is measured, not guessed: ``calibration.json``
holds a normal fit to the scores of the population's calibration models (clean models only, see
bench/population.py). A model has K x F of them (classes x families); the chance that a clean
model shows none above s is Phi((s - mean) / std) ^ (K F), and that number is the class's
``probability``. A class is flagged when it is above ``flag_probability`` (about 1% false
positives per clean model at 0.99) and its trigger also works on the held-out split, not only on
the images it was searched on.

Each trigger's held-out ASR when moved by one pixel is reported too, but decides nothing: the
smallest working BadNets trigger is a few pixels of the true square, and moved by one pixel it
lost most of its effect (measured: 88% -> 35%), so a shift test rejects real backdoors.
"""

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .config import DetectionConfig
from .recovery import FoundTrigger

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")


@dataclass(frozen=True)
class Calibration:
    mean: float
    std: float
    models: int  # clean calibration models it was fitted on
    source: str

    @classmethod
    def load(cls, path: Path = CALIBRATION_FILE) -> "Calibration":
        return cls(**json.loads(path.read_text()))

    @classmethod
    def fit(cls, scores: list[float], models: int, source: str) -> "Calibration":
        """A normal fit whose spread is taken from the upper half only (the root mean square of
        the values above the median): flags live in the upper tail, and a heavy upper tail must
        widen the fit rather than be averaged away by the lower half."""
        median = statistics.median(scores)
        upper = [r - median for r in scores if r > median]
        return cls(median, math.sqrt(statistics.fmean(d * d for d in upper)), models, source)

    @classmethod
    def scores_only(cls) -> "Calibration":
        """A calibration under which nothing is ever flagged: for collecting the scores of the
        calibration models themselves."""
        return cls(math.inf, 1.0, 0, "scores only")

    def probability(self, score: float, tests: int) -> float:
        """Chance that a clean model with ``tests`` scores shows none as high as this one."""
        phi = 0.5 * (1 + math.erf((score - self.mean) / (self.std * math.sqrt(2))))
        return phi ** tests

    def score_for(self, probability: float, tests: int) -> float:
        """The score whose probability is ``probability`` (the flagging line of the chart)."""
        return self.mean + self.std * statistics.NormalDist().inv_cdf(probability ** (1 / tests))


@dataclass
class ClassScore:
    target: int
    family: str
    size: float
    log_ratio: float  # log(median class's size / this size), in its family
    transfer_asr: float  # held-out ASR of the same trigger on the reference model, as it is
    reference_ratio: float | None  # log(its budget on the reference / its budget here); None: not a candidate
    score: float  # min(log_ratio, reference_ratio): what the calibration judges
    asr: float  # held-out
    shifted_asr: float
    probability: float
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
                trigger.asr, trigger.shifted_asr, probability,
                flagged=probability >= cfg.flag_probability and trigger.asr >= cfg.min_held_out_asr,
            ))
    return sorted(scores, key=lambda s: -s.score)


def backdoor_probability(scores: list[ClassScore]) -> float:
    return max((s.probability for s in scores), default=0.0)
