"""The whole sanitization run, top to bottom: validate, recover triggers, detect, unlearn, report.

The CLI, the service's worker and the bench all call ``sanitize``; it knows nothing of HTTP,
queues or databases. ``progress(stage, fraction, message)`` reports overall progress in [0, 1];
``check_cancel()`` is called between steps and raises ``Cancelled`` to stop the run.
"""

import json
import platform
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .config import SanitizeConfig
from .detection import detect_targets
from .errors import InputError
from .images import trigger_pictures
from .loading import LoadedModel, Samples, load_model, load_samples, save_model
from .recovery import BlendFamily, MaskFamily, PatchFamily, default_patch_size, recover_triggers
from .unlearning import unlearn

Progress = Callable[[str, float, str], None]

# Share of the progress bar each stage takes.
STAGES = {"validate": (0.0, 0.05), "recovery": (0.05, 0.6), "unlearning": (0.6, 0.95),
          "report": (0.95, 1.0)}


class Normalized(nn.Module):
    """Applies the configured per-channel normalisation in front of the user's model, so the
    pipeline always feeds [0, 1] images while the saved model keeps its own input contract."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        device = next(model.parameters()).device
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, device=device).view(1, -1, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def stratified_split(y: torch.Tensor, holdout_fraction: float, seed: int):
    """Indices (train, held-out); every class keeps about the same share in both."""
    g = torch.Generator().manual_seed(seed)
    train, hold = [], []
    for c in y.unique():
        members = (y == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        n_hold = int(round(len(members) * holdout_fraction)) if len(members) > 1 else 0
        hold.append(members[:n_hold])
        train.append(members[n_hold:])
    return torch.cat(train).sort().values, torch.cat(hold).sort().values


@torch.no_grad()
def validate(model: nn.Module, samples: Samples, num_classes: int | None, device) -> tuple[int, float, list[str]]:
    """Checks that the model and the samples fit together; returns (K, accuracy, warnings).

    What the model computes never appears in these messages beyond the shape of its output: an
    uploaded model could otherwise hand back, through its error, anything it managed to read."""
    batch = samples.x[:8]
    try:
        logits = model(batch.to(device))
    except Exception as e:  # any failure here means the images do not fit the model
        if isinstance(e, torch.jit.Error):  # the model's own `raise`: its text is the model's to choose
            reason = "the model raised an exception of its own"
        else:  # torch's error, whose last line names shapes and types (the lines above are a traceback)
            lines = str(e).strip().splitlines()
            reason = lines[-1][:300] if lines else type(e).__name__
        raise InputError(f"the model failed on a batch of the samples (shape {tuple(batch.shape)}): {reason}") from e
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != len(batch):
        if not isinstance(logits, torch.Tensor):
            shape = type(logits).__name__
        else:  # a shape with many dimensions is a way to smuggle out numbers
            shape = str(tuple(logits.shape)) if logits.dim() <= 4 else f"a tensor with {logits.dim()} dimensions"
        raise InputError(f"the model must return (N, K) logits; it returned {shape}")
    k = logits.shape[1]
    if num_classes is not None and num_classes != k:
        raise InputError(f"num_classes is {num_classes} but the model outputs {k} logits")
    if k < 2:
        raise InputError("the model must output at least 2 classes")
    low, high = int(samples.y.min()), int(samples.y.max())
    if low < 0 or high >= k:
        raise InputError(f"labels must lie in [0, {k}); found labels from {low} to {high}")
    correct = sum((model(xb.to(device)).argmax(1).cpu() == yb).sum().item()
                  for xb, yb in zip(samples.x.split(500), samples.y.split(500)))
    accuracy = correct / len(samples.y)
    warnings = []
    if accuracy < 2 / k:
        warnings.append(
            f"the model's accuracy on the samples is {accuracy:.1%}, near chance for {k} classes: "
            "check the preprocessing (scaling, mean/std) and the label order"
        )
    if len(samples.y) < 20 * k:
        warnings.append(f"only {len(samples.y)} samples for {k} classes; results will be noisy")
    return k, accuracy, warnings


def sanitize(model_path: Path, samples_path: Path, out_dir: Path, config: SanitizeConfig,
             progress: Progress | None = None, check_cancel: Callable[[], None] | None = None) -> dict:
    """Runs the whole pipeline and writes DIR/model.<ext>, DIR/report.json and DIR/triggers/."""
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def report_progress(stage: str, fraction: float, message: str) -> None:
        if check_cancel:
            check_cancel()
        if progress:
            low, high = STAGES[stage]
            progress(stage, low + (high - low) * min(max(fraction, 0.0), 1.0), message)

    seed_everything(config.seed)
    device = pick_device(config.device)
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. Validate.
    report_progress("validate", 0.0, "loading samples and model")
    samples = load_samples(samples_path, config.class_names)
    channels = samples.x.shape[1]
    if config.mean is not None and len(config.mean) != channels:
        raise InputError(f"mean/std have {len(config.mean)} values but the images have {channels} channels")
    loaded = load_model(model_path, config.arch, config.num_classes, channels, device)
    loaded.module.eval()
    for p in loaded.module.parameters():
        p.requires_grad_(False)
    model = Normalized(loaded.module, config.mean, config.std) if config.mean else loaded.module
    num_classes, accuracy, warnings = validate(model, samples, config.num_classes, device)
    train_idx, hold_idx = stratified_split(samples.y, config.holdout_fraction, config.seed)
    if len(hold_idx) == 0 or len(train_idx) == 0:
        raise InputError("too few samples to hold out a validation split; give at least 2 per class")
    x_train, y_train = samples.x[train_idx].to(device), samples.y[train_idx].to(device)
    x_hold, y_hold = samples.x[hold_idx].to(device), samples.y[hold_idx].to(device)
    timings["validate"] = time.perf_counter() - started

    # 2. Recover a trigger per class and family; 3. detect targets.
    t0 = time.perf_counter()
    shape = tuple(samples.x.shape[1:])
    patch_size = config.recovery.patch_size or default_patch_size(shape[1], shape[2])
    families = {"patch": PatchFamily(shape, patch_size), "mask": MaskFamily(shape),
                "blend": BlendFamily(shape)}
    chosen = [families[name] for name in config.recovery.families]
    per_class = [[] for _ in range(num_classes)]
    for i, family in enumerate(chosen):
        def on_step(step, total, i=i, family=family):
            report_progress("recovery", (i + step / total) / len(chosen),
                            f"{family.name} triggers, step {step}/{total}")

        for trigger in recover_triggers(model, family, x_train, y_train, x_hold, y_hold,
                                        num_classes, config.recovery, on_step):
            per_class[trigger.target].append(trigger)
    scores = detect_targets(per_class, config.detection)
    flagged = [s for s in scores if s.flagged]
    triggers = [next(t for t in per_class[s.target] if t.family.name == s.family) for s in flagged]
    timings["recovery"] = time.perf_counter() - t0

    # 4. Unlearn (only when something was found: a clean model is returned byte for byte).
    t0 = time.perf_counter()
    out_model = out_dir / f"model{model_path.suffix or '.pt'}"
    result = None
    if triggers:
        result = unlearn(
            model, triggers, x_train, y_train, x_hold, y_hold, num_classes, config.unlearning,
            config.recovery, seed=config.seed,
            on_step=lambda step, total: report_progress(
                "unlearning", step / total, f"unlearning step {step}/{total}"),
            check_cancel=check_cancel,
        )
        save_model(loaded, out_model)
    else:
        shutil.copyfile(model_path, out_model)
    timings["unlearning"] = time.perf_counter() - t0

    # 5. Report and trigger pictures.
    report_progress("report", 0.0, "writing the report")
    trigger_dir = out_dir / "triggers"
    trigger_dir.mkdir(exist_ok=True)
    trigger_files = []
    for trigger in triggers:
        for kind, png in trigger_pictures(trigger, x_hold[:16], config.seed).items():
            name = f"class{trigger.target}_{trigger.family.name}_{kind}.png"
            (trigger_dir / name).write_bytes(png)
            trigger_files.append({"class": trigger.target, "family": trigger.family.name,
                                  "kind": kind, "file": f"triggers/{name}"})
    timings["total"] = time.perf_counter() - started
    if result:
        clean_accuracy = {"before": result.before.clean_accuracy, "after": result.after.clean_accuracy}
    else:  # the model is untouched: held-out accuracy is the same before and after
        held_out = sum((model(xb).argmax(1) == yb).sum().item()
                       for xb, yb in zip(x_hold.split(500), y_hold.split(500))) / len(y_hold)
        clean_accuracy = {"before": held_out, "after": held_out}
    report = {
        "backdoor_detected": bool(triggers),
        "detected_targets": [t.target for t in triggers],
        "class_scores": [
            {"class": s.target, "family": s.family, "trigger_size": round(s.size, 5),
             "recovered_asr": round(s.asr, 4), "anomaly_index": round(s.anomaly_index, 3),
             "flagged": s.flagged}
            for s in scores
        ],
        "clean_accuracy": clean_accuracy,
        "recovered_asr": {
            str(t.target): {"before": result.before.recovered_asr[t.target],
                            "after": result.after.recovered_asr[t.target]}
            for t in triggers
        },
        "sample_accuracy": accuracy,
        "num_classes": num_classes,
        "num_samples": {"train": len(train_idx), "held_out": len(hold_idx)},
        "unlearning": None if result is None else {
            "steps": result.steps, "epochs": round(result.epochs, 2), "rollbacks": result.rollbacks,
        },
        "model_format": loaded.format,
        "model_changed": bool(triggers),
        "triggers": trigger_files,
        "warnings": warnings,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "config": config.model_dump(),
        "versions": {"baerase": __version__, "torch": torch.__version__,
                     "python": platform.python_version(), "device": str(device)},
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    report_progress("report", 1.0, "done")
    return report
