"""Which classes are backdoor targets: a calibrated score per class and trigger family, not
hand-set floors. A class's score is the smaller of how small its trigger is among the model's
classes (the larger of its log ratio, how much smaller its budget is than the median class's, and
its screen log ratio, the same of the size its search held after the first round), scaled to the
reference ratio's spread, and its reference ratio (how much more of the same trigger a reference
model trained on the clean samples alone needs, beyond what it needs of the other classes' it follows),
or, if larger, its excess (how much smaller it is among the model's classes than the reference's own
smallest trigger for the class is among the reference's), mapped onto the same scale;
``calibration.json``, fitted per model kind on clean calibration models only, sets the scales and
turns the highest score into ``backdoor_probability``.
docs/method.md, section 3, explains each part and the measurements behind it.
"""

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

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

    def at(self, probability: float, tests: float) -> float:
        """The value that all of ``tests`` clean values stay below with ``probability``."""
        return self.mean + self.std * statistics.NormalDist().inv_cdf(probability ** (1 / tests))


@dataclass(frozen=True)
class ExcessFit:
    """How clean calibration models' excesses (``ClassScore.excess``) spread: each family's scale
    (the upper-half spread of its classes' excesses, ``upper_normal``), and a normal fit of each
    model's highest excess counted in those scales."""

    scales: dict[str, float]
    highest: NormalFit


class CleanClass(NamedTuple):
    """What the calibration fits of one class and family of a clean calibration model."""

    family: str
    log_ratio: float
    screen_log_ratio: float
    reference_ratio: float | None
    excess: float | None


@dataclass(frozen=True)
class Calibration:
    # Fitted apart for each model kind (retuning.KINDS): BatchNorm ResNets' ordinary classes score
    # higher than plain CNNs', and one fit of both put the plain CNNs' flagging line above where
    # their well-trained backdoors score (docs/method.md, section 3).
    # How much more a clean candidate's reference ratio varies than its log ratio: the log ratio
    # is counted in reference-ratio units (``class_score``).
    log_ratio_scale: dict[str, float]
    # How much more clean classes' log ratios vary than their screen log ratios: the screen log
    # ratio is counted in log-ratio units (``smallness``).
    screen_scale: dict[str, float]
    # The highest class score of each clean calibration model: a model is judged as a whole, as
    # clean models are, and a line fitted on every class score apart put 2 of the 5 perceptrons it
    # was fitted on over it (their ordinary classes' high scores come together, not one in 30).
    scores: dict[str, NormalFit]
    tests: dict[str, int]  # class scores (classes x families) of each of those models
    models: dict[str, int]  # clean calibration models of each kind it was fitted on
    source: str
    # The re-tuning statistic (retuning.py) of the same models' classes, unlearnt as if targets.
    retuning: dict[str, NormalFit]
    # The excess's fit of each kind it was measured on; a kind without one is judged without it
    # (and its models never search the reference, ``measures_excess``).
    excess: dict[str, ExcessFit | None] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path = CALIBRATION_FILE) -> "Calibration":
        fields = json.loads(path.read_text())
        fits = {name: {kind: NormalFit(**fit) for kind, fit in fields[name].items()} for name in ("scores", "retuning")}
        excess = {kind: None if fit is None else ExcessFit(fit["scales"], NormalFit(**fit["highest"]))
                  for kind, fit in fields.get("excess", {}).items()}
        return cls(**{**fields, **fits, "excess": excess})

    @classmethod
    def fit(cls, classes: dict[str, list[list[CleanClass]]], retuning: dict[str, list[float] | None],
            source: str, keep: "Calibration | None" = None) -> "Calibration":
        """classes[kind]: for each of the kind's clean calibration models, its every class and
        family; retuning[kind]: their re-tuning statistics (None: keep ``keep``'s fit, which the
        same models measured). A kind with no models keeps ``keep``'s fits: one kind can be
        refitted without training the other's models again. The excess is fitted where it was
        measured on every class."""
        unfitted = [kind for kind in KINDS if not classes.get(kind)]
        kept_retuning = [kind for kind in KINDS if kind not in unfitted and retuning.get(kind) is None]
        if (unfitted or kept_retuning) and keep is None:
            raise ValueError(f"no calibration models or re-tuning statistics of kind "
                             f"{', '.join(unfitted + kept_retuning)}, and no fit to keep")
        few = [kind for kind in KINDS if kind not in unfitted and len(classes[kind]) < 2]
        if few:  # the spread of the models' highest scores needs two of them at least
            raise ValueError(f"one calibration model of kind {', '.join(few)}: a fit needs two or more")
        names = ("log_ratio_scale", "screen_scale", "scores", "tests", "models", "retuning", "excess")
        fits = {name: {} for name in names}
        for kind in KINDS:  # in this order, so that calibration.json's keys keep theirs
            if kind in unfitted:
                for name, fit in fits.items():
                    fit[kind] = getattr(keep, name).get(kind)
                continue
            models = classes[kind]
            every = [c for model in models for c in model]
            screen_scale = (upper_normal([c.log_ratio for c in every])[1]
                            / upper_normal([c.screen_log_ratio for c in every])[1])
            scale = log_ratio_scale([(smallness(c.log_ratio, c.screen_log_ratio, screen_scale), c.reference_ratio)
                                     for c in every])
            fits["screen_scale"][kind], fits["log_ratio_scale"][kind] = screen_scale, scale
            fits["scores"][kind] = NormalFit.of([max(class_score(smallness(c.log_ratio, c.screen_log_ratio,
                                                                           screen_scale), c.reference_ratio, scale)
                                                     for c in model) for model in models])
            fits["tests"][kind] = round(statistics.fmean(len(model) for model in models))
            fits["models"][kind] = len(models)
            fits["retuning"][kind] = (keep.retuning[kind] if kind in kept_retuning
                                      else NormalFit.of(retuning[kind]))
            fits["excess"][kind] = (None if any(c.excess is None for c in every) else excess_fit(models))
        return cls(**fits, source=source)

    @classmethod
    def scores_only(cls) -> "Calibration":
        """A calibration under which nothing is ever flagged, and nothing re-tuned counts as
        dormant: for collecting the calibration models' own scores."""
        return cls({kind: 1.0 for kind in KINDS}, {kind: 1.0 for kind in KINDS}, never_dormant(),
                   dict.fromkeys(KINDS, 1), dict.fromkeys(KINDS, 0), "scores only", never_dormant())

    @property
    def collects_scores(self) -> bool:
        return all(math.isinf(fit.mean) for fit in self.scores.values())

    def measures_excess(self, kind: str) -> bool:
        """Whether detection searches the reference's own triggers on a model of ``kind``: where
        the excess is fitted, and when collecting scores to fit it."""
        return self.excess.get(kind) is not None or self.collects_scores

    def statistics(self, kind: str) -> int:
        """How many statistics judge each class and family: a class score is the larger of two
        where the excess is fitted (``excess_score``), and a clean model has two chances, not
        one, to show a high one."""
        return 1 if self.excess.get(kind) is None else 2

    def excess_score(self, excess: float | None, family: str, kind: str) -> float:
        """An excess counted as a class score: as many of the clean models' spreads above their
        highest excesses' centre as a score above their highest scores' (the two normal fits'
        quantiles matched). -inf where not measured, or not fitted for the kind or family."""
        fit = self.excess.get(kind)
        if excess is None or fit is None or family not in fit.scales:
            return -math.inf
        z = (excess / fit.scales[family] - fit.highest.mean) / fit.highest.std
        return self.scores[kind].mean + self.scores[kind].std * z

    def probability(self, score: float, tests: int, kind: str) -> float:
        """Chance that a clean model of this kind with ``tests`` scores shows none as high as this
        one: its highest of ``self.tests`` scores stays below it, once or, for fewer or more
        tests (and for each statistic, ``statistics``), that fraction or multiple of a time."""
        return self.scores[kind].below(score) ** (tests * self.statistics(kind) / self.tests[kind])

    def retuning_probability(self, statistic: float, tests: int, kind: str) -> float:
        """Chance that ``tests`` unlearnt classes of clean models of this kind all re-tune less than this."""
        return self.retuning[kind].below(statistic) ** tests

    def score_for(self, probability: float, tests: int, kind: str) -> float:
        """The score whose probability is ``probability`` (the flagging line of the chart)."""
        return self.scores[kind].at(probability, tests * self.statistics(kind) / self.tests[kind])

    def dormancy_line(self, probability: float, tests: int, kind: str) -> float:
        """The re-tuning statistic above which ``tests`` unlearnt classes count as dormant: above
        what clean models' unlearnt classes show with ``probability``, or above 0, faster than the
        reference, which never had the trigger, learns it. The second decides on BatchNorm models,
        whose clean unlearnt classes re-learn up to e^6 times faster than the reference (the line
        fitted on them: +3.6): under that line alone a WaNet ResNet was reported `removed` while a
        short re-tuning brought its true trigger back to 44% (clean ResNets: 3-9%)."""
        return min(0.0, self.retuning[kind].at(probability, tests))


def excess_fit(models: list[list[CleanClass]]) -> ExcessFit:
    """The excess's fit of one kind's clean calibration models (``ExcessFit``)."""
    every = [c for model in models for c in model]
    scales = {family: upper_normal([c.excess for c in every if c.family == family])[1]
              for family in sorted({c.family for c in every})}
    return ExcessFit(scales, NormalFit.of([max(c.excess / scales[c.family] for c in model) for model in models]))


def never_dormant() -> dict[str, NormalFit]:
    """A line that no score or statistic reaches, for every kind."""
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
    screen_log_ratio: float  # the same of the screen sizes
    transfer_asr: float | None  # held-out ASR of the same trigger on the reference model, as it is; None: not a candidate
    reference_ratio: float | None  # reference_ratios: its budget ratio beyond the other classes' (reference_offset); None: not measured
    excess: float | None  # its log ratio less the reference's own trigger's (``excesses``); None: not measured
    score: float  # class_score, or the excess's if larger (Calibration.excess_score): what the calibration judges
    asr: float  # held-out
    shifted_asr: float | None  # None: not a candidate
    probability: float  # against every class and family of a clean model: how a model is judged
    # Against one class's families only: how a class already known to be a target is judged
    # (its other families are then a few planned tests, not a search over every class).
    class_probability: float
    flagged: bool
    # ``probability`` of its budget alone, without the screen: whether the trigger recovered is itself
    # unusually small, and so whether unlearning it and re-tuning it reach a trigger like the backdoor's.
    budget_probability: float


def log_ratios(sizes: list[float]) -> list[float]:
    """One family's trigger sizes, one per class -> how much smaller than the median class's each
    is, in log units (a failed search counts as the family's ``whole`` size)."""
    logs = [math.log(max(size, 1e-6)) for size in sizes]
    median = statistics.median(logs)
    return [median - v for v in logs]


def budget_ratio(reference_size: float, size: float) -> float:
    """log(budget on the reference / budget on the model)."""
    return math.log(max(reference_size, 1e-6) / max(size, 1e-6))


def reference_offset(found: list[FoundTrigger], own: int) -> float:
    """The median budget ratio, in one family, of the other classes whose trigger the reference
    follows at all (0 where it follows none): how much more of any of the model's triggers the
    reference needs, against which class ``own``'s ratio counts. The longer a model was trained,
    the more readily it answers its own triggers, every class alike: the clean perceptrons' median
    mask needed 0.9 to 1.2 times its budget on the reference after 20,000 images x 2 epochs, 1.6 to
    2.6 after the whole set x 4, 2.4 to 3.1 x 8, and counted against the reference as it was, their
    ordinary classes scored the higher the longer they were trained (docs/population.md,
    twenty-fourth sitting).

    A trigger the reference never follows has no ratio, only a floor (its budget there is the
    family's whole): counted as ratios, the floors of a BadNets small CNN's six masks set the
    median above its target's (the reference needed 11 times more of the target's trigger), and
    the model, its backdoor at 89% attack success, came out clean. The class's own ratio is left
    out: where the reference follows the target's trigger alone (a Blended ResNet's blend factor,
    15 times more on the reference), it would be its own median (docs/population.md, twenty-sixth
    sitting)."""
    measured = [budget_ratio(t.reference_size, t.size) for i, t in enumerate(found)
                if i != own and t.reference_size is not None and t.reference_size < t.family.whole]
    return statistics.median(measured) if measured else 0.0


def reference_ratios(found: list[FoundTrigger]) -> list[float | None]:
    """Each class's budget ratio beyond the other classes' the reference follows (``reference_offset``),
    where measured."""
    return [None if t.reference_size is None else budget_ratio(t.reference_size, t.size) - reference_offset(found, i)
            for i, t in enumerate(found)]


def reference_line(calibration: Calibration, cfg: DetectionConfig, families: int, tests: int, kind: str) -> float:
    """The smallness above which the reference model is needed, on a model with ``families`` trigger
    families and ``tests`` scores: the lowest line any decision uses, the flagging line of a
    flagged class's other families (judged as ``families`` tests, ``class_probability``) or the
    suspicious or flagging line of the model's scores (``probability``, ``budget_probability``). A
    class's score is at most its scaled smallness, so below that line the reference cannot change a
    verdict, and the scaled smallness stands as its score. Judged as one class's families, the
    suspicious line is no decision's: taken as the line, it put nearly every model's ordinary
    classes above it and trained the reference for nearly every clean model (twenty-fourth
    sitting). Collecting the calibration's own scores measures every candidate (smallness > 0):
    the fit needs true scores."""
    if calibration.collects_scores:
        return 0.0
    lines = [calibration.score_for(cfg.flag_probability, families, kind),
             calibration.score_for(min(cfg.suspicious_probability, cfg.flag_probability), tests, kind)]
    return max(0.0, min(lines) / calibration.log_ratio_scale[kind])


def smallness(log_ratio: float, screen_log_ratio: float, screen_scale: float) -> float:
    """How small a class's trigger is among the model's classes, in log-ratio units: its log ratio,
    or its screen log ratio counted ``screen_scale`` times if that is larger. A faint trigger over
    the whole image can need no smaller a budget than other classes and still be found far sooner:
    a Blended small ResNet's target held at 0.074 (mask) and 0.092 (blend) after the first round,
    other classes at 0.43-0.89, though its budgets were ordinary (docs/method.md, section 3)."""
    return max(log_ratio, screen_scale * screen_log_ratio)


def class_score(smallness: float, ratio: float | None, scale: float) -> float:
    """The smaller of the smallness, counted ``scale`` times, and the reference ratio: a target is
    small among the model's classes *and* small only for this model."""
    scaled = scale * smallness
    return scaled if ratio is None or smallness <= 0 else min(scaled, ratio)


def log_ratio_scale(ratios: list[tuple[float, float | None]]) -> float:
    """How much more clean models' candidates (smallness > 0, reference measured) spread in
    reference ratio than in smallness (``upper_normal`` spreads)."""
    candidates = [(small, rr) for small, rr in ratios if small > 0 and rr is not None]
    return upper_normal([rr for _, rr in candidates])[1] / upper_normal([small for small, _ in candidates])[1]


def excesses(log_ratios_on_model: list[float], reference_log_ratios: list[float] | None) -> list[float | None]:
    """Each class's log ratio on the model less the log ratio of the reference's own smallest
    trigger for it (the reference's search, not the model's triggers): how much easier the class
    is to reach in the model than the clean samples alone make it. The reference ratio sizes the
    model's trigger on the reference, and a reference of another seed may follow it half again as
    well: the black-square BadNets small CNN s11 scored 0.87 with one reference and 0.53-0.59,
    `clean`, with two others; its excess cleared every clean model's by 1.1 (docs/population.md,
    thirty-sixth sitting)."""
    if reference_log_ratios is None:
        return [None] * len(log_ratios_on_model)
    return [model - reference for model, reference in zip(log_ratios_on_model, reference_log_ratios)]


def score_classes(per_family: list[list[FoundTrigger]], calibration: Calibration, cfg: DetectionConfig,
                  kind: str, reference_log_ratios: dict[str, list[float]] | None = None) -> list[ClassScore]:
    """per_family[f][c]: class c's trigger in family f, with its held-out and transfer ASRs
    filled in, on a model of ``kind``; reference_log_ratios[family]: the log ratios of the
    reference's own triggers, where searched. Returns every (class, family) score, the most
    suspicious first."""
    tests = sum(len(found) for found in per_family)
    scores = []
    for found in per_family:
        family = found[0].family.name
        budget_ratios = log_ratios([t.size for t in found])
        screen_ratios = log_ratios([t.screen_size for t in found])
        family_excesses = excesses(budget_ratios, (reference_log_ratios or {}).get(family))
        for trigger, log_ratio, screen_ratio, ratio, excess in zip(found, budget_ratios, screen_ratios,
                                                                   reference_ratios(found), family_excesses):
            small = smallness(log_ratio, screen_ratio, calibration.screen_scale[kind])
            excess_score = calibration.excess_score(excess, family, kind)
            score = max(class_score(small, ratio, calibration.log_ratio_scale[kind]), excess_score)
            probability = calibration.probability(score, tests, kind)
            budget_score = max(class_score(log_ratio, ratio, calibration.log_ratio_scale[kind]), excess_score)
            scores.append(ClassScore(
                trigger.target, family, trigger.size, log_ratio, screen_ratio, trigger.transfer_asr,
                ratio, excess, score,
                trigger.asr, trigger.shifted_asr, probability,
                calibration.probability(score, len(per_family), kind),
                flagged=probability >= cfg.flag_probability and trigger.asr >= cfg.min_held_out_asr,
                budget_probability=calibration.probability(budget_score, tests, kind),
            ))
    return sorted(scores, key=lambda s: -s.score)


def uploaded_probability(family: list[FoundTrigger], target: int, uploaded_size: float,
                         reference_size: float | None, reference_log_ratio: float | None,
                         calibration: Calibration, kind: str, tests: int) -> float:
    """The budget probability that a trigger found after unlearning would have had in the first
    detection, on the model as uploaded: its budget there (``uploaded_size``) among the sizes of
    its family that the first detection found on the uploaded model (``family``, one per class, the
    class's own replaced), and against the reference's budget beyond the other classes' (``reference_offset``). A
    backdoor the first detection missed is as small on the uploaded model; a weakness that
    unlearning made is not. Its excess counts against the reference's own trigger's log ratio
    (``reference_log_ratio``), where searched."""
    sizes = [t.size for t in family]
    sizes[target] = uploaded_size
    log_ratio = log_ratios(sizes)[target]
    ratio = None if reference_size is None else budget_ratio(reference_size, uploaded_size) - reference_offset(family, target)
    excess = None if reference_log_ratio is None else log_ratio - reference_log_ratio
    score = max(class_score(log_ratio, ratio, calibration.log_ratio_scale[kind]),
                calibration.excess_score(excess, family[target].family.name, kind))
    return calibration.probability(score, tests, kind)


def backdoor_probability(scores: list[ClassScore]) -> float:
    return max((s.probability for s in scores), default=0.0)
