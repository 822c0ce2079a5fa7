"""Uploaded TorchScript models are code: only pure tensor operations may run, nothing that
touches files, the system, threads or printing (worker/sanitize/operations.py), and what a model
computes does not come back in error messages. The issue's payload, a forward that calls
torch.from_file(path, shared=True, size=8), is refused by `baerase sanitize` and by the service
without the file being touched."""

import io
import subprocess
import sys
from pathlib import Path
from typing import Tuple
from uuid import UUID

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.security.payloads import TinyCNN, WritesAFile, samples, torchscript
from worker.runner import run_job
from worker.sanitize.architectures import ARCHITECTURES, build_model
from worker.sanitize.errors import InputError
from worker.sanitize.loading import Samples, load_model
from worker.sanitize.operations import check_operations

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def loaded(module: nn.Module) -> torch.jit.ScriptModule:
    """The module as the worker sees it: scripted, saved and loaded again."""
    return torch.jit.load(io.BytesIO(torchscript(module)))


def test_the_payload_is_live(tmp_path):
    """Run without the checks, the model does write the file: the tests below refuse a real attack."""
    proof = tmp_path / "proof"
    loaded(WritesAFile(proof))(torch.rand(2, 1, 8, 8))
    assert proof.read_bytes() == torch.full((8,), 80.0).numpy().tobytes()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_builtin_architecture_passes(name):
    check_operations(loaded(build_model(name, num_classes=10, in_channels=3)))


def stochastic_depth(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """As torchvision.ops.stochastic_depth (EfficientNet, ConvNeXt) computes it."""
    if not training or p == 0.0:
        return x
    noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device)
    return x * noise.bernoulli_(1.0 - p).div_(1.0 - p)


class CommonLayers(nn.Module):
    """Layers and functions that real classifiers use beyond the built-in architectures, among
    them the blocks of torchvision's MobileNetV3, EfficientNet, ConvNeXt and ViT (for where
    torchvision is not installed)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, groups=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.norms = nn.ModuleList([nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.InstanceNorm2d(8)])
        self.acts = nn.ModuleList([nn.ReLU6(), nn.LeakyReLU(), nn.ELU(), nn.GELU(), nn.SiLU(), nn.Mish(),
                                   nn.Hardswish(), nn.Hardsigmoid(), nn.Sigmoid(), nn.Tanh(), nn.PReLU()])
        self.pools = nn.ModuleList([nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AdaptiveMaxPool2d(4)])
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.layer_norm = nn.LayerNorm(8)
        self.dropout = nn.Dropout2d(0.1)
        self.squeeze, self.excite = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        torch._assert(x.dim() == 4, "expected NCHW images")
        x = self.depthwise(self.conv(x))
        x = x * F.hardsigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(x, 1)))))
        x = x + stochastic_depth(x, 0.1, self.training)
        x = self.layer_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        for norm in self.norms:
            x = norm(x)
        x = F.interpolate(self.up(x), size=(8, 8), mode="bilinear", align_corners=False)
        x = F.pad(x, [1, 1, 1, 1], mode="reflect")
        for act in self.acts:
            x = act(x)
        for pool in self.pools:
            x = pool(x)
        tokens = self.dropout(x).flatten(2).transpose(1, 2)
        tokens, _ = self.attention(tokens, tokens, tokens)
        x = self.layer_norm(tokens).mean(1) + torch.cat([x, x], 1)[:, :8].amax(dim=(2, 3))
        return F.log_softmax(self.fc(F.normalize(x, dim=1)), dim=1)



def test_common_layers_pass():
    model = loaded(CommonLayers())
    check_operations(model)
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "squeezenet1_0",
                                  "shufflenet_v2_x0_5", "regnet_y_400mf", "densenet121"])
def test_torchvision_models_pass(name):
    models = pytest.importorskip("torchvision.models")
    check_operations(loaded(models.get_model(name, weights=None, num_classes=10)))


class Prints(nn.Module):
    def forward(self, x):
        print(x.sum())
        return x.flatten(1)[:, :3]


class Saves(nn.Module):
    def __init__(self, path: Path):
        super().__init__()
        self.path = str(path)

    def forward(self, x):
        torch.save(x, self.path)
        return x.flatten(1)[:, :3]


@pytest.mark.parametrize("payload, operation", [("from_file", "aten::from_file"), ("save", "aten::save"),
                                                ("print", "prim::Print")])
def test_operations_outside_tensors_are_refused(tmp_path, payload, operation):
    target = tmp_path / "target"
    module = {"from_file": WritesAFile(target), "save": Saves(target), "print": Prints()}[payload]
    path = tmp_path / "model.pt"
    path.write_bytes(torchscript(module))
    with pytest.raises(InputError, match=f"uses the operation {operation} "):
        load_model(path, None, None, 1, CPU)
    assert not target.exists()


class SetsStateOnLoad(nn.Module):
    """``__setstate__`` runs inside torch.jit.load, before any graph could be checked."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = str(path)
        self.w = torch.ones(3)

    def forward(self, x):
        return x.flatten(1)[:, :3] * self.w

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return self.w, self.path, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        self.path = state[1]
        self.w = state[0] + torch.from_file(self.path, shared=True, size=3).fill_(80)
        self.training = state[2]


def test_code_that_runs_while_loading_is_refused_before_loading(tmp_path):
    proof = tmp_path / "proof"
    torch.jit.load(io.BytesIO(torchscript(SetsStateOnLoad(proof))))  # live: loading alone writes
    assert proof.exists()

    target = tmp_path / "target"
    path = tmp_path / "model.pt"
    path.write_bytes(torchscript(SetsStateOnLoad(target)))
    with pytest.raises(InputError, match="defines __setstate__"):
        load_model(path, None, None, 1, CPU)
    assert not target.exists()


def test_baerase_sanitize_refuses_the_payload(tmp_path):
    target = tmp_path / "target"  # absent: the payload would create it
    model, clean = tmp_path / "model.pt", tmp_path / "clean.npz"
    model.write_bytes(torchscript(WritesAFile(target)))
    clean.write_bytes(samples())
    done = subprocess.run([sys.executable, "-m", "app.cli", "sanitize", str(model), "--samples", str(clean),
                           "--out", str(tmp_path / "out"), "--quiet"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "aten::from_file" in errors[0], done.stderr
    assert not target.exists()


def test_the_service_refuses_the_payload(app, client, submit, auth, tmp_path):
    target = tmp_path / "target"  # present: the payload would overwrite its first bytes
    target.write_bytes(b"webhook secret of another tenant")
    response = submit(model=torchscript(WritesAFile(target)), samples=samples())
    assert response.status_code == 202
    job = response.json()
    assert run_job(app.state.sessions, app.state.store, app.state.settings, UUID(job["id"])) == "failed"
    error = client.get(job["links"]["self"], headers=auth).json()["error"]
    assert error["code"] == "invalid_input" and "aten::from_file" in error["message"], error
    assert target.read_bytes() == b"webhook secret of another tenant"


class RaisesWithData(nn.Module):
    def forward(self, x):
        if bool(x.sum() > -1):
            raise ValueError("leaked " + str(x.sum().item()))
        return x.flatten(1)[:, :3]


class ReturnsDataAsShape(nn.Module):
    """Encodes numbers in the shape of its output, as the issue's model leaked a file's bytes."""

    def forward(self, x):
        return torch.zeros(1, 72, 87, 69, 82, 69)


@pytest.mark.parametrize("module, leaked", [(RaisesWithData(), "leaked"), (ReturnsDataAsShape(), "72")])
def test_what_a_model_computes_stays_out_of_its_error(module, leaked):
    from worker.sanitize.pipeline import validate

    x = torch.rand(8, 1, 8, 8)
    with pytest.raises(InputError) as refused:
        validate(loaded(module), Samples(x, torch.arange(8) % 3), None, CPU)
    assert leaked not in str(refused.value)
    assert "(8, 1, 8, 8)" in str(refused.value) or "6 dimensions" in str(refused.value)


def test_torch_errors_still_say_what_does_not_fit():
    from worker.sanitize.pipeline import validate

    x = torch.rand(8, 1, 16, 16)  # TinyCNN wants 8x8 images
    with pytest.raises(InputError, match=r"mat1 and mat2 shapes cannot be multiplied \(8x1024 and 256x3\)"):
        validate(loaded(TinyCNN()), Samples(x, torch.arange(8) % 3), None, CPU)
