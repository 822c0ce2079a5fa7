"""The report of one sanitization run (report.json), as a typed model: ``pipeline.sanitize``
builds it, the service stores it once (the job's report column) and reads every number it shows
from it. docs/method.md explains what the numbers mean.

``Report.from_stored`` also reads the reports that older versions stored (see
``with_scores``): a job's page and result keep working after an upgrade. Torch-free, so that the
API and the worker's own process can read reports without loading the engine.
"""

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# What the engine calls with (stage, overall fraction in [0, 1], message) as it goes.
ProgressCallback = Callable[[str, float, str], None]


class ReportPart(BaseModel):
    # Fields that later versions dropped are ignored; "class" is a Python keyword, hence aliases.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class BeforeAfter(ReportPart):
    before: float
    after: float


class AccuracyChange(BeforeAfter):
    """Clean accuracy on the held-out report split. ``margin``: half-width of the 95% interval of
    the change (after - before); a smaller change cannot be told from the split's noise. Reports
    of older versions lack ``images`` and ``margin``."""
    images: int | None = None
    margin: float | None = None


class ClassAccuracyChange(AccuracyChange):
    """One class's accuracy on the report split's images of that class. Unlearning can cost one
    class nearly all of its accuracy while the others gain: unlearnt at step size 0.01, perceptrons'
    targets fell from about 80% recall to 10-20% as the total lost 2-5 points (docs/population.md,
    twenty-ninth sitting)."""
    class_: int = Field(alias="class")


class ReportedScore(ReportPart):
    """One class and trigger family from a trigger search, scored (docs/method.md, "Detection").
    Reports of older versions lack some of these numbers."""

    class_: int = Field(alias="class")
    family: str
    trigger_size: float | None = None
    screen_size: float | None = None
    log_ratio: float | None = None
    screen_log_ratio: float | None = None
    transfer_asr: float | None = None
    reference_ratio: float | None = None
    excess: float | None = None  # its log ratio less the reference's own trigger's (detection.excesses)
    score: float | None = None
    held_out_asr: float | None = None
    shifted_asr: float | None = None
    probability: float | None = None
    class_probability: float | None = None  # judged among one class's families (Detection.to_unlearn)
    budget_probability: float | None = None  # the probability of its budget alone, without the screen
    flagged: bool = False


class RetuningRow(ReportPart):
    """The re-tuning check of one unlearnt class (docs/method.md, "Verification"): its found
    trigger's held-out ASR on the sanitized model, then on copies of it and of the reference model
    fine-tuned one epoch with a few images stamped with it."""

    class_: int = Field(alias="class")
    family: str
    asr: float
    retuned_asr: float
    reference_asr: float
    statistic: float  # log odds of retuned_asr minus those of reference_asr
    probability: float  # against clean models' unlearnt classes, as many as were checked
    # The clean models it was judged against: "batchnorm" (models with running statistics), "plain"
    # (convolutional) or "dense" (fully connected only); reports of older versions lack it.
    kind: str | None = None


class Verification(ReportPart):
    """The search from scratch after unlearning, and the re-tuning check (reports of older
    versions lack it)."""

    rounds: int
    backdoor_probability: float
    class_scores: list[ReportedScore]
    retuning: list[RetuningRow] = []
    # The statistic above which an unlearnt class counts as dormant (Calibration.dormancy_line);
    # None in reports of older versions.
    dormancy_line: float | None = None
    # Classes the verification flagged that a further round left alone: their trigger is not
    # unusually small on the model as uploaded, so unlearning made it (pipeline.split_side_effects).
    side_effects: list[int] = []


class UnlearningSummary(ReportPart):
    rounds: int
    epochs: int
    steps: int
    rollbacks: int


class CalibrationSource(ReportPart):
    models: int  # clean calibration models of the kind that judged the scores
    source: str
    kind: str | None = None  # the model kind whose clean models judged the scores; None in older reports


class SampleCounts(ReportPart):
    train: int
    held_out: int


class TriggerFile(ReportPart):
    """One picture of a recovered trigger, under the output directory."""

    class_: int = Field(alias="class")
    family: str
    kind: str  # mask, pattern or stamped
    # The file name is checked: the report comes from the sandboxed engine, and the worker copies
    # these files into the artifact store.
    file: str = Field(pattern=r"^triggers/[A-Za-z0-9_-]{1,100}\.png$")

    @property
    def name(self) -> str:
        """The picture's name in URLs: class0_mask_pattern."""
        return self.file.removeprefix("triggers/").removesuffix(".png")


class Report(ReportPart):
    verdict: Literal["clean", "suspicious", "removed", "residual"] = "clean"
    verdict_reason: str = ""
    backdoor_probability: float = 0.0
    backdoor_detected: bool
    detected_targets: list[int]
    residual_targets: list[int] = []
    class_scores: list[ReportedScore]
    flag_score: float | None = None  # the score at which a class is flagged
    clean_accuracy: AccuracyChange
    class_accuracy: list[ClassAccuracyChange] = []  # by class; empty in reports of older versions
    recovered_asr: dict[str, BeforeAfter]  # by detected target
    verification: Verification | None = None
    sample_accuracy: float
    num_classes: int
    class_names: list[str] | None = None  # the config's, or the class folders of a .zip
    num_samples: SampleCounts
    unlearning: UnlearningSummary | None = None
    calibration: CalibrationSource | None = None
    model_format: str  # torchscript | state_dict | safetensors (formats.py), or module in memory
    model_changed: bool
    # The sanitized model's file beside report.json (formats.sanitized_name). None for a run on an
    # in-memory model, and in reports stored before it was named here. A bare name: the worker
    # copies this file out of the sandbox's output folder.
    model_file: str | None = Field(None, pattern=r"^[^/\\]+$")
    triggers: list[TriggerFile]
    warnings: list[str]
    timings_s: dict[str, float]  # by stage, and the total
    config: dict  # the run's SanitizeConfig, as the engine of its day had it
    versions: dict[str, str]

    @model_validator(mode="before")
    @classmethod
    def upgrade(cls, data):
        return with_scores(data) if isinstance(data, dict) else data

    @classmethod
    def from_stored(cls, stored: dict) -> "Report":
        """A report as any version stored it (report.json, or a job's report column)."""
        return cls.model_validate(stored)

    def to_json(self) -> dict:
        """The report as report.json holds it."""
        return self.model_dump(mode="json", by_alias=True)

    def headline(self) -> dict:
        """What `baerase sanitize` prints: the verdict and the numbers before and after."""
        return self.model_dump(mode="json", by_alias=True, include={
            "verdict", "verdict_reason", "backdoor_probability", "detected_targets", "residual_targets",
            "clean_accuracy", "class_accuracy", "recovered_asr", "timings_s"})

    def class_name(self, index: int) -> str:
        names = self.class_names or []
        return names[index] if 0 <= index < len(names) else str(index)

    def score_of(self, target: int, family: str) -> float | None:
        return next((s.score for s in self.class_scores if (s.class_, s.family) == (target, family)), None)

    def not_erased(self) -> list[str]:
        """The detected targets whose recovered trigger unlearning did not bring down to the
        configured ASR threshold."""
        threshold = self.config["unlearning"]["asr_threshold"]
        return [target for target, asr in self.recovered_asr.items() if asr.after > threshold]


def with_scores(report: dict) -> dict:
    """Reports stored before detection scores (no reference model) have log ratios only: each
    log ratio stands in for the score, so an older job still shows its result and chart."""
    if "flag_score" in report or "flag_log_ratio" not in report:
        return report
    return report | {
        "flag_score": report["flag_log_ratio"],
        "class_scores": [{"score": s.get("log_ratio"), "transfer_asr": None} | s for s in report["class_scores"]],
    }
