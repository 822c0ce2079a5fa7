"""Models as training code leaves them: checkpoint dicts, wrapper prefixes, safetensors metadata,
BackdoorBench's results, torchvision's and timm's architectures by name, torch.export archives.
Each loads into the engine and is written back as it came."""

import importlib
import types

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from worker.sanitize.architectures import build_model
from worker.sanitize.config import SanitizeConfig
from worker.sanitize.errors import InputError
from worker.sanitize.formats import model_format
from worker.sanitize.loading import load_model, save_model

CPU = torch.device("cpu")


def importable(library: str):
    """The library, or None where it is missing or built for another torch (torchvision's PyPI
    wheels need CUDA torch: next to the CPU build they raise RuntimeError on import)."""
    try:
        return importlib.import_module(library)
    except Exception:
        return None


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=10, in_channels=1).eval()


def same_outputs(a: nn.Module, b: nn.Module, channels: int = 1, size: int = 28) -> bool:
    x = torch.rand(3, channels, size, size)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-6)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 7, "hyper_parameters": {"lr": 0.1}},  # Lightning-style
    lambda sd: {"model": sd, "model_name": "small_cnn", "num_classes": 10},  # BackdoorBench-style
    lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {"state": {}, "param_groups": []}},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},  # DataParallel
    lambda sd: {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},  # DDP of a compiled model
], ids=["state_dict", "model", "model_state_dict", "module-prefix", "nested-prefixes"])
def test_checkpoints_are_unwrapped_and_written_back_as_they_came(tmp_path, cnn, wrap):
    torch.save(wrap(cnn.state_dict()), tmp_path / "in.pt")
    loaded = load_model(tmp_path / "in.pt", "small_cnn", None, 1, CPU)
    assert same_outputs(loaded.module, cnn)

    with torch.no_grad():
        loaded.module.fc2.bias.add_(1.0)  # as unlearning would change it
    save_model(loaded, tmp_path / "out.pt")
    before = torch.load(tmp_path / "in.pt", weights_only=True)
    after = torch.load(tmp_path / "out.pt", weights_only=True)
    assert model_format(tmp_path / "out.pt") == "state_dict"
    assert before.keys() == after.keys()  # the same checkpoint entries (epoch, optimizer, ...)
    for key, value in before.items():
        if not isinstance(value, (dict, torch.Tensor)):
            assert after[key] == value
    again = load_model(tmp_path / "out.pt", "small_cnn", None, 1, CPU)
    assert torch.equal(again.module.fc2.bias, cnn.fc2.bias + 1.0)  # under the same names


def test_safetensors_keep_their_prefix_and_metadata(tmp_path, cnn):
    state = {f"module.{k}": v for k, v in cnn.state_dict().items()}
    save_file(state, str(tmp_path / "in.safetensors"), metadata={"source": "trainer v2"})
    loaded = load_model(tmp_path / "in.safetensors", "small_cnn", None, 1, CPU)
    assert loaded.format == "safetensors" and same_outputs(loaded.module, cnn)
    save_model(loaded, tmp_path / "out.safetensors")
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:
        assert f.metadata() == {"source": "trainer v2"}
        assert set(f.keys()) == set(state)


def test_a_checkpoint_without_weights_says_where_they_should_be(tmp_path):
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "ckpt.pt")
    with pytest.raises(InputError, match="'state_dict' or 'model' or 'model_state_dict'"):
        load_model(tmp_path / "ckpt.pt", "small_cnn", 10, 1, CPU)


def test_backdoorbench_preactresnet18_attack_result(tmp_path):
    """BackdoorBench's attack_result.pt: model_name, num_classes, the weights under "model" with
    its PreActResNet18's names (layer1.0.bn1, linear; no final batch norm)."""
    torch.manual_seed(0)
    model = build_model("backdoorbench:preactresnet18", num_classes=10, in_channels=3).eval()
    names = list(model.state_dict())
    assert names[:2] == ["conv1.weight", "layer1.0.bn1.weight"] and names[-2:] == ["linear.weight", "linear.bias"]
    assert "layer2.0.shortcut.0.weight" in names and "layer1.0.shortcut.0.weight" not in names
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": model.state_dict(),
                "img_size": (32, 32, 3)}, tmp_path / "attack_result.pt")
    loaded = load_model(tmp_path / "attack_result.pt", "backdoorbench:preactresnet18", None, 3, CPU)
    assert same_outputs(loaded.module, model, channels=3, size=32)


def test_a_checkpoint_holding_more_than_weights_is_refused_with_a_way_out(tmp_path, cnn):
    """BackdoorBench's attack results can carry data sets as numpy arrays: not loadable with
    weights_only=True, so refused, with how to save the weights alone."""
    torch.save({"model": cnn.state_dict(), "bd_test": np.zeros((2, 3), np.uint8)}, tmp_path / "r.pt")
    with pytest.raises(InputError, match=r"torch.save\(checkpoint\['model'\], path\)"):
        load_model(tmp_path / "r.pt", "small_cnn", None, 1, CPU)


def test_torch_export_archives_are_refused_before_loading(tmp_path, cnn):
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(cnn, (torch.rand(2, 1, 28, 28),)), path)
    with pytest.raises(InputError, match="torch.export archive .* refused: loading one runs Python code"):
        model_format(path)


@pytest.mark.parametrize("arch, accepted", [
    ("torchvision:resnet18", True), ("timm:resnet18.a1_in1k", True), ("backdoorbench:preactresnet18", True),
    ("torchvision:", False), ("keras:resnet18", False), ("timm:../../etc", False), ("torchvision:" + "x" * 101, False),
])
def test_architecture_names_in_the_config(arch, accepted):
    if accepted:
        assert SanitizeConfig(arch=arch).arch == arch
    else:
        with pytest.raises(ValueError):
            SanitizeConfig(arch=arch)


def test_a_missing_library_is_a_clear_input_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(InputError, match="needs timm, which this machine cannot import.*baerase\\[models\\]"):
        build_model("timm:resnet18", num_classes=10, in_channels=3)


def test_library_models_are_built_by_their_own_name_and_class_count(monkeypatch):
    """What build_model asks of torchvision, with a stand-in for it: the name, no weights (nothing
    is downloaded), the class count; and its errors become input errors."""
    calls = []

    def get_model(name, weights, num_classes):
        calls.append((name, weights, num_classes))
        if name != "resnet18":
            raise ValueError(f"Unknown model {name}")
        return nn.Linear(3, num_classes)

    fake = types.SimpleNamespace(models=types.SimpleNamespace(get_model=get_model))
    monkeypatch.setitem(__import__("sys").modules, "torchvision", fake)
    assert build_model("torchvision:resnet18", num_classes=7, in_channels=3).out_features == 7
    assert calls == [("resnet18", None, 7)]
    with pytest.raises(InputError, match=r"torchvision cannot build 'resnet1' .*list_models\(\)"):
        build_model("torchvision:resnet1", num_classes=7, in_channels=3)
    with pytest.raises(InputError, match="3-channel images"):
        build_model("torchvision:resnet18", num_classes=7, in_channels=1)


torchvision = importable("torchvision")
timm = importable("timm")


@pytest.mark.skipif(torchvision is None, reason="torchvision cannot be imported here (PyPI's wheels "
                    "need CUDA torch; pip install 'baerase[models]' next to a matching torch)")
def test_torchvision_resnet18_with_10_classes(tmp_path):
    model = torchvision.models.resnet18(num_classes=10).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "tv.pt")
    loaded = load_model(tmp_path / "tv.pt", "torchvision:resnet18", None, 3, CPU)
    assert same_outputs(loaded.module, model, channels=3, size=32)
    save_model(loaded, tmp_path / "out.pt")
    assert torch.load(tmp_path / "out.pt", weights_only=True)["state_dict"].keys() == \
        {f"module.{k}" for k in model.state_dict()}


@pytest.mark.skipif(timm is None, reason="timm cannot be imported here (it needs torchvision; "
                    "pip install 'baerase[models]' next to a matching torch)")
def test_timm_resnet18_safetensors(tmp_path):
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    save_file(model.state_dict(), str(tmp_path / "timm.safetensors"))
    loaded = load_model(tmp_path / "timm.safetensors", "timm:resnet18", None, 3, CPU)
    assert same_outputs(loaded.module, model, channels=3, size=32)
