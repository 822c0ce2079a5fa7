"""Settings of one sanitization run. Every field has a default that works without tuning."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


# Built-in architectures (worker/sanitize/architectures.py builds them). Listed here too, without
# torch, so the API can reject an unknown name before queueing a job.
ARCHITECTURE_NAMES = ("small_cnn", "small_resnet", "resnet18", "preact_resnet18", "vgg11")


class Strict(BaseModel):
    # A misspelt option must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")


class RecoveryConfig(Strict):
    families: list[Literal["patch", "mask", "blend"]] = ["patch", "mask", "blend"]
    patch_size: int | None = Field(None, ge=1, description="side of the patch trigger; default ~H/9")
    steps: int = Field(200, ge=10, description="most generator steps per family")
    batch_size: int = Field(16, ge=4, description="clean images per class per step")
    noise_dim: int = Field(64, ge=4)
    hidden: int = Field(256, ge=16)
    lr: float = Field(0.01, gt=0, description="learning rate of the generators' MLPs")
    base_lr: float = Field(0.1, gt=0, description="learning rate of each class's central trigger")
    mask_penalty: float = Field(1.0, ge=0, description="lambda: starting weight of the mask and blend size penalty")
    mi_weight: float = Field(0.1, ge=0, description="alpha: weight of the MINE entropy term")
    hinge: float = Field(0.9, gt=0, le=1, description="beta: target probability that is enough")
    screen_ratio: float = Field(
        0.5, gt=0, le=1, description="after 30% of the steps, mask and blend searches "
        "larger than this share of the median size stop"
    )
    success_asr: float = Field(0.9, gt=0, le=1, description="ASR at which a trigger counts as found")


class DetectionConfig(Strict):
    anomaly_index: float = Field(2.0, gt=0, description="MAD anomaly index that flags a class")
    min_asr: float = Field(0.6, gt=0, le=1, description="held-out ASR a flagged class must reach")
    max_size_ratio: float = Field(
        0.2, gt=0, le=1, description="a flagged trigger is at most this share of the median size"
    )


class UnlearningConfig(Strict):
    max_epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=4)
    lr: float = Field(0.01, gt=0)
    l1_anchor: float = Field(1e-6, ge=0, description="lambda of ||theta - theta0||_1")
    asr_threshold: float = Field(0.05, ge=0, le=1, description="recovered ASR that counts as erased")
    refresh_steps: int = Field(10, ge=0, description="generator steps against the current model before each check")
    size_slack: float = Field(1.5, ge=1, description="refreshed masks and blend factors may grow to this multiple of the recovered size")
    checks_per_epoch: int = Field(2, ge=1)
    patience: int = Field(4, ge=1, description="checks without a better checkpoint before stopping")
    accuracy_tolerance: float = Field(
        0.05, ge=0, le=1, description="patience only runs out once a checkpoint is within this "
        "much of the original held-out accuracy"
    )


class SanitizeConfig(Strict):
    arch: str | None = Field(None, description="built-in architecture of a state_dict upload")
    num_classes: int | None = Field(None, ge=2)
    mean: list[float] | None = Field(None, description="per-channel mean applied before the model")
    std: list[float] | None = Field(None, description="per-channel std applied before the model")
    class_names: list[str] | None = Field(None, description="label order of a class-folder zip")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    holdout_fraction: float = Field(0.2, gt=0, lt=0.9)
    recovery: RecoveryConfig = RecoveryConfig()
    detection: DetectionConfig = DetectionConfig()
    unlearning: UnlearningConfig = UnlearningConfig()

    @model_validator(mode="after")
    def check_arch_and_normalization(self):
        if self.arch is not None and self.arch not in ARCHITECTURE_NAMES:
            raise ValueError(f"unknown arch {self.arch!r}; built-in: {', '.join(ARCHITECTURE_NAMES)}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.std is not None and (
            len(self.std) != len(self.mean) or any(s <= 0 for s in self.std)
        ):
            raise ValueError("mean and std need one value per channel, and std must be > 0")
        return self
