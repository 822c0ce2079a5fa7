"""Settings of one sanitization run. Every field has a default that works without tuning."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .architecture_names import ARCHITECTURE_HELP, is_known_architecture


class Strict(BaseModel):
    # A misspelt option must fail loudly, not be ignored; NaN and Infinity are never a setting.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RecoveryConfig(Strict):
    families: list[Literal["mask", "blend", "warp", "patch"]] = Field(
        ["mask", "blend", "warp"], min_length=1, max_length=4)
    patch_size: int | None = Field(None, ge=1, le=64, description="side of the patch trigger; default ~H/9")
    screen_steps: int = Field(30, ge=1, le=5000, description="search steps every class gets")
    refine_steps: int = Field(240, ge=0, le=20000, description="further steps for the finalists")
    finalists: int = Field(10, ge=1, le=1000, description="classes with the smallest triggers that get the refine steps")
    batch_size: int = Field(16, ge=4, le=512, description="clean images per class per search step")
    lr: float = Field(0.2, gt=0, le=10, description="Adam learning rate of the trigger parameters")
    init_penalty: float = Field(1.0, gt=0, le=1e4, description="starting weight of the size penalty")
    patience: int = Field(5, ge=1, le=1000, description="steps before the size penalty moves (Neural Cleanse)")
    converged_after: int = Field(30, ge=1, le=20000, description="a class stops once its trigger has not shrunk for this many steps")
    success_asr: float = Field(0.9, gt=0, le=1, description="batch ASR at which a trigger counts as working")
    noise_dim: int = Field(64, ge=4, le=1024, description="generator noise size")
    hidden: int = Field(256, ge=16, le=4096, description="generator hidden width")
    generator_steps: int = Field(100, ge=0, le=20000, description="max-entropy generator steps per flagged class")
    generator_lr: float = Field(1e-3, gt=0, le=1)
    mi_weight: float = Field(0.1, ge=0, le=100, description="alpha: weight of the MINE entropy term")
    hinge: float = Field(0.9, gt=0, le=1, description="beta: target probability that is enough")


class DetectionConfig(Strict):
    flag_probability: float = Field(0.99, gt=0, lt=1, description="calibrated probability that flags a class")
    suspicious_probability: float = Field(0.8, gt=0, lt=1, description="probability above which an unflagged model is reported suspicious")
    min_held_out_asr: float = Field(0.5, ge=0, le=1, description="held-out ASR a flagged trigger must reach")
    budget_asr: float = Field(0.5, gt=0, le=1, description="held-out ASR at which a mask trigger's pixel budget is measured")
    reference_epochs: int = Field(30, ge=1, le=200, description="epochs of the reference model trained on the clean samples")


class UnlearningConfig(Strict):
    epochs: int = Field(5, ge=0, le=100, description="passes over the training split (0: no unlearning)")
    batch_size: int = Field(64, ge=4, le=4096)
    lr: float = Field(0.01, gt=0, le=1, description="SGD learning rate, cosine-annealed to 0, of models with BatchNorm (lr_plain, lr_dense: convolutional and fully connected models without it)")
    lr_plain: float = Field(0.02, gt=0, le=1, description="the learning rate on convolutional models without BatchNorm: at 0.01 eleven backdoored small CNNs lost 1.4 points of accuracy on average, at 0.02 0.4 (docs/population.md, thirty-first sitting)")
    lr_dense: float = Field(0.02, gt=0, le=1, description="the learning rate on fully connected models (no convolution): at 0.01 the unlearnt target's accuracy had not recovered by the last epoch")
    fisher_weight: float = Field(3000.0, ge=0, le=1e6, description="weight of the Fisher-weighted L2 anchor to the original weights (unless every trigger is a warp)")
    fisher_weight_warp: float = Field(10000.0, ge=0, le=1e6, description="the anchor's weight when every trigger unlearnt is a warp")
    nearness_weight: float = Field(10.0, ge=0, le=1000, description="how much more a triggered image counts the nearer its clean image is to the trigger's target class (0: all alike)")
    path_radius: float = Field(0.02, ge=0, le=0.5, description="each step's loss is taken this far back towards the original weights, as a share of their norm, so that the way back to the backdoor is unlearnt too (path-aware minimisation; models without running statistics only, and dropped where an epoch diverges with it; 0: off)")
    asr_threshold: float = Field(0.05, ge=0, le=1, description="recovered ASR that counts as erased")
    rounds: int = Field(2, ge=1, le=5, description="unlearning rounds while verification still flags a trigger")


class SanitizeConfig(Strict):
    arch: str | None = Field(None, max_length=120, description=f"architecture of a state_dict or safetensors "
                             f"model: {ARCHITECTURE_HELP}")
    num_classes: int | None = Field(None, ge=2, le=10_000)
    mean: list[float] | None = Field(None, max_length=64, description="per-channel mean applied before the model")
    std: list[float] | None = Field(None, max_length=64, description="per-channel std applied before the model")
    class_names: list[Annotated[str, Field(max_length=200)]] | None = Field(
        None, max_length=10_000, description="label order of a class-folder zip")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    holdout_fraction: float = Field(0.2, gt=0, lt=0.9)
    recovery: RecoveryConfig = RecoveryConfig()
    detection: DetectionConfig = DetectionConfig()
    unlearning: UnlearningConfig = UnlearningConfig()

    @model_validator(mode="after")
    def check_arch_and_normalization(self):
        if self.arch is not None and not is_known_architecture(self.arch):
            raise ValueError(f"unknown arch {self.arch!r}; give {ARCHITECTURE_HELP}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.std is not None and (
            len(self.std) != len(self.mean) or any(s <= 0 for s in self.std)
        ):
            raise ValueError("mean and std need one value per channel, and std must be > 0")
        return self
