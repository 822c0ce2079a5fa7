"""Which classes are backdoor targets: the ones whose smallest working trigger is an outlier.

A backdoor target needs far less trigger than any natural class to flip most images. Sizes are
compared only where they measure the same thing (a family's ``scale``: the share of the image a
patch or mask covers, or the blend factor of a full-image pattern); a blended trigger is small by
its blend factor but large by area, so one ranking of all families would hide it. Within a scale
each class gets the size of its best trigger, and the median absolute deviation of the log sizes
says how unusual it is, as in Neural Cleanse. MAD alone invents backdoors when every size is
similar (a tiny spread makes any gap look large), so a flagged class must also pass two absolute
floors: its trigger really flips most held-out images, and it is several times smaller than the
median class's. A class is a target if it is flagged on any scale.
"""

import math
import statistics
from dataclasses import dataclass

from .config import DetectionConfig
from .recovery import RecoveredTrigger

MAD_TO_SIGMA = 1.4826  # makes the MAD of a normal sample estimate its standard deviation


@dataclass
class ClassScore:
    target: int
    family: str
    size: float
    asr: float
    anomaly_index: float
    flagged: bool


def best_trigger(candidates: list[RecoveredTrigger], min_asr: float) -> RecoveredTrigger:
    """A class's strongest trigger: the smallest among those that work, else the most effective."""
    working = [t for t in candidates if t.asr >= min_asr]
    if working:
        return min(working, key=lambda t: t.size)
    return max(candidates, key=lambda t: t.asr)


def anomaly_indices(values: list[float]) -> list[float]:
    """How many robust standard deviations each value lies BELOW the median (small = suspicious)."""
    median = statistics.median(values)
    mad = MAD_TO_SIGMA * statistics.median(abs(v - median) for v in values)
    return [(median - v) / max(mad, 1e-6) for v in values]


def detect_targets(per_class: list[list[RecoveredTrigger]], cfg: DetectionConfig) -> list[ClassScore]:
    """per_class[c] holds class c's recovered trigger from every family. Each class's score is
    from the scale on which it is flagged, else from the one on which it looks most suspicious."""
    scales = dict.fromkeys(t.family.scale for candidates in per_class for t in candidates)
    by_scale = [score_classes([[t for t in candidates if t.family.scale == scale]
                               for candidates in per_class], cfg)
                for scale in scales]
    return [max(scores, key=lambda s: (s.flagged, s.anomaly_index)) for scores in zip(*by_scale)]


def score_classes(per_class: list[list[RecoveredTrigger]], cfg: DetectionConfig) -> list[ClassScore]:
    """Scores of the classes' triggers of one scale."""
    best = [best_trigger(candidates, cfg.min_asr) for candidates in per_class]
    # A class that never reached the target counts as needing the whole image.
    sizes = [t.size if t.asr >= cfg.min_asr else 1.0 for t in best]
    logs = [math.log(max(s, 1e-6)) for s in sizes]
    indices = anomaly_indices(logs)
    median_size = statistics.median(sizes)
    return [
        ClassScore(
            target=t.target, family=t.family.name, size=size, asr=t.asr, anomaly_index=index,
            flagged=(index > cfg.anomaly_index and t.asr >= cfg.min_asr
                     and size <= cfg.max_size_ratio * median_size),
        )
        for t, size, index in zip(best, sizes, indices)
    ]
