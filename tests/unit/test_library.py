"""The engine as a library: ``sanitize_model`` on an in-memory model and tensors runs the pipeline
of ``sanitize`` (files), and the README's "Use as a library" example runs as written. On the toy
models and data of test_verification.py."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.live_server import REPO
from tests.unit.test_verification import (SMALL, TOY_CALIBRATION, attack_success, files,  # noqa: F401
                                          toy_images)
from worker.sanitize.config import SanitizeConfig
from worker.sanitize.errors import InputError
from worker.sanitize.pipeline import sanitize, sanitize_model


def toy_tensors(samples_path) -> tuple[torch.Tensor, torch.Tensor]:
    """The toy samples as the file pipeline reads them: (N, 1, H, W) in [0, 1], labels."""
    with np.load(samples_path) as samples:
        return torch.from_numpy(samples["x"]).float().div(255).unsqueeze(1), torch.from_numpy(samples["y"])


def test_a_model_in_memory_is_sanitized_as_its_file_is(files, tmp_path):  # noqa: F811
    model = torch.jit.load(str(files["backdoored"]))
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    x, y = toy_tensors(files["samples"])
    config = SanitizeConfig(seed=0, **SMALL)
    stages = []

    sanitized = sanitize_model(model, x, y, config, progress=lambda stage, *_: stages.append(stage),
                               calibration=TOY_CALIBRATION)
    from_files = sanitize(files["backdoored"], files["samples"], tmp_path, config, calibration=TOY_CALIBRATION)

    # One pipeline: the same report, but for the file the model went to and the time it took.
    def comparable(report: dict) -> dict:
        return {key: value for key, value in report.items() if key not in ("model_file", "timings_s")}

    assert comparable(sanitized.report.to_json()) == comparable(from_files)
    assert sanitized.report.verdict == "removed" and sanitized.report.model_file is None
    assert stages[0] == "validate" and stages[-1] == "report"
    test_x, test_y = toy_images(1000, seed=3)
    assert attack_success(sanitized.model, test_x, test_y) < 0.1
    # The model given is left as it was; the copy returned trains again if asked to.
    assert attack_success(model, test_x, test_y) > 0.9
    assert all(torch.equal(weights[name], tensor) for name, tensor in model.state_dict().items())
    assert all(p.requires_grad for p in sanitized.model.parameters())
    # The trigger pictures are those `sanitize` writes, by the names the report gives them.
    assert set(sanitized.trigger_pictures) == {picture.file for picture in sanitized.report.triggers}
    assert sanitized.trigger_pictures == {file: (tmp_path / file).read_bytes() for file in sanitized.trigger_pictures}


IMAGES, LABELS = torch.rand(40, 1, 12, 12), torch.arange(40) % 6


@pytest.mark.parametrize("x, y, options, says", [
    ((IMAGES * 255).byte(), LABELS, {}, "x must be float images of shape (N, C, H, W)"),
    (IMAGES[:, 0], LABELS, {}, "x must be float images of shape (N, C, H, W)"),
    (IMAGES * 2, LABELS, {}, "scaled to [0, 1]; for a model that expects normalised input, give mean and std"),
    (IMAGES.clone().fill_(float("nan")), LABELS, {}, "NaN or infinite"),
    (IMAGES, LABELS.float(), {}, "y must hold one integer label per image (40)"),
    (IMAGES, LABELS[:30], {}, "y must hold one integer label per image (40)"),
    (IMAGES.numpy(), LABELS, {}, "x and y must be torch tensors; got ndarray"),
    (IMAGES, LABELS, {"arch": "small_cnn"}, "sanitize_model takes the model itself"),
    (IMAGES, LABELS, {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}, "mean/std have 3 values but the images have 1"),
])
def test_unusable_tensors_are_refused_with_what_to_fix(x, y, options, says):
    with pytest.raises(InputError) as refused:
        sanitize_model(torch.nn.Linear(144, 6), x, y, SanitizeConfig(**options))
    assert says in str(refused.value)


def readme_library_example() -> str:
    section = (REPO / "README.md").read_text().split("## Use as a library", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(files, tmp_path):  # noqa: F811
    # The files `make demo` leaves, stood in for by the toy model and samples (of the same kinds:
    # a TorchScript archive, and grey uint8 (N, H, W) images with their labels).
    (tmp_path / "demo-out").mkdir()
    (tmp_path / "demo-out" / "backdoored.pt").write_bytes(files["backdoored"].read_bytes())
    (tmp_path / "demo-out" / "clean_samples.npz").write_bytes(files["samples"].read_bytes())
    run = subprocess.run([sys.executable, "-c", readme_library_example()], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    verdict = run.stdout.splitlines()[-1].split()[0]
    assert verdict in ("clean", "suspicious", "removed", "residual") and "100% report" in run.stdout
    sanitized = torch.jit.load(str(tmp_path / "backdoored.sanitized.pt"))
    assert sanitized(torch.rand(2, 1, 12, 12)).shape == (2, 6)
