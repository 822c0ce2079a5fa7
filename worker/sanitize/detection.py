"""Which classes are backdoor targets: a calibrated score per class, not hand-set floors.

A backdoor target needs far less trigger than any natural class to flip most images. Within each
family (each measures size on its own scale) every class gets z = how many robust standard
deviations its log trigger size lies below the median class's, as in Neural Cleanse. The median
and the MAD are over all classes, so two or three targets among ten still leave both to the clean
classes.

How large a z a clean model shows by chance is measured, not guessed: ``calibration.json`` holds a
normal fit to the z-scores of the population's calibration models (clean models only, see
bench/population.py). A model has K x F z-scores (classes x families); the chance that a clean
model shows none above z is Phi((z - mean) / std) ^ (K F), and that number is the class's
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

MAD_TO_SIGMA = 1.4826  # makes the MAD of a normal sample estimate its standard deviation
# Log-size spread below which classes count as equally spread. Without it, a family where most
# classes' searches fail (all "whole") has a MAD of 0, and the one class that works by a natural
# feature gets an enormous z: measured on clean Fashion-MNIST models, z up to 24.
MIN_SPREAD = 0.5
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
    def fit(cls, z_scores: list[float], models: int, source: str) -> "Calibration":
        """A normal fit whose spread is taken from the upper half only (the root mean square of
        the z-scores above the median): flags live in the upper tail, and a heavy upper tail must
        widen the fit rather than be averaged away by the lower half."""
        median = statistics.median(z_scores)
        upper = [z - median for z in z_scores if z > median]
        return cls(median, math.sqrt(statistics.fmean(d * d for d in upper)), models, source)

    @classmethod
    def scores_only(cls) -> "Calibration":
        """A calibration under which nothing is ever flagged: for collecting the z-scores of the
        calibration models themselves."""
        return cls(math.inf, 1.0, 0, "scores only")

    def probability(self, z: float, tests: int) -> float:
        """Chance that a clean model with ``tests`` z-scores shows none as high as z."""
        phi = 0.5 * (1 + math.erf((z - self.mean) / (self.std * math.sqrt(2))))
        return phi ** tests

    def z_for(self, probability: float, tests: int) -> float:
        """The z-score whose probability is ``probability`` (the flagging line of the chart)."""
        return self.mean + self.std * statistics.NormalDist().inv_cdf(probability ** (1 / tests))


@dataclass
class ClassScore:
    target: int
    family: str
    size: float
    z: float
    asr: float  # held-out
    shifted_asr: float
    probability: float
    flagged: bool


def robust_z(values: list[float]) -> list[float]:
    """How many robust standard deviations each value lies BELOW the median (small = suspicious)."""
    median = statistics.median(values)
    spread = max(MAD_TO_SIGMA * statistics.median(abs(v - median) for v in values), MIN_SPREAD)
    return [(median - v) / spread for v in values]


def z_scores(found: list[FoundTrigger]) -> list[float]:
    """One family's triggers, one per class -> their z-scores (a failed search counts as the
    family's ``whole`` size)."""
    return robust_z([math.log(max(t.size, 1e-6)) for t in found])


def score_classes(per_family: list[list[FoundTrigger]], calibration: Calibration,
                  cfg: DetectionConfig) -> list[ClassScore]:
    """per_family[f][c]: class c's trigger in family f, with its held-out ASRs filled in.
    Returns every (class, family) score, the most suspicious first."""
    tests = sum(len(found) for found in per_family)
    scores = []
    for found in per_family:
        for trigger, z in zip(found, z_scores(found)):
            probability = calibration.probability(z, tests)
            scores.append(ClassScore(
                trigger.target, trigger.family.name, trigger.size, z, trigger.asr, trigger.shifted_asr,
                probability,
                flagged=probability >= cfg.flag_probability and trigger.asr >= cfg.min_held_out_asr,
            ))
    return sorted(scores, key=lambda s: -s.z)


def backdoor_probability(scores: list[ClassScore]) -> float:
    return max((s.probability for s in scores), default=0.0)
