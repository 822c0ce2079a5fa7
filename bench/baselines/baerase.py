"""BAERASE, ours: exactly the pipeline `baerase sanitize` and the service's workers run, through
the same files (a TorchScript model and an .npz of clean samples) and the default settings."""

import tempfile
from pathlib import Path

import torch
from torch import nn

from worker.sanitize.config import SanitizeConfig
from worker.sanitize.pipeline import sanitize

from ..train import save_samples

# Every stage still runs, on a few steps, so the bench's quick path exercises the whole pipeline.
QUICK = {"recovery": {"screen_steps": 10, "refine_steps": 10, "generator_steps": 10},
         "unlearning": {"epochs": 1, "rounds": 1}}

# What the bench keeps of the report: the verdict a user would act on, and why.
FINDINGS = ("verdict", "backdoor_probability", "detected_targets", "residual_targets", "verdict_reason")


def defend(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
           seed: int = 0, quick: bool = False) -> tuple[nn.Module, dict]:
    # The engine runs on the device the bench gave the model and the images ("cpu" or "cuda").
    config = SanitizeConfig(seed=seed, device=x.device.type, num_classes=num_classes,
                            **(QUICK if quick else {}))
    with tempfile.TemporaryDirectory() as tmp:
        model_path, samples_path, out = Path(tmp, "model.pt"), Path(tmp, "samples.npz"), Path(tmp, "out")
        torch.jit.save(torch.jit.script(model), str(model_path))
        save_samples(samples_path, x, y)
        report = sanitize(model_path, samples_path, out, config)
        findings = {key: report[key] for key in FINDINGS}
        return torch.jit.load(str(out / report["model_file"]), map_location=x.device).eval(), findings
