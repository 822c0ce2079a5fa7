"""Every model and sample loader, and every bad input they must refuse with a clear message."""

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from worker.sanitize.architectures import ARCHITECTURES, build_model
from worker.sanitize.architecture_names import ARCHITECTURE_NAMES
from worker.sanitize.errors import InputError
from worker.sanitize.formats import model_format
from worker.sanitize.loading import load_model, load_samples, save_model

CPU = torch.device("cpu")


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=10, in_channels=1).eval()


def test_registry_lists_every_architecture_and_each_runs():
    assert set(ARCHITECTURES) == set(ARCHITECTURE_NAMES)
    for name in ARCHITECTURES:
        model = build_model(name, num_classes=7, in_channels=3).eval()
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_torchscript_round_trip(tmp_path, cnn):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(cnn), str(path))
    loaded = load_model(path, None, None, 1, CPU)
    assert loaded.format == "torchscript"
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(loaded.module(x), cnn(x))
    save_model(loaded, tmp_path / "out.pt")
    assert model_format(tmp_path / "out.pt") == "torchscript"


def test_state_dict_and_safetensors_round_trip(tmp_path, cnn):
    torch.save(cnn.state_dict(), tmp_path / "w.pth")
    save_file(cnn.state_dict(), str(tmp_path / "w.safetensors"))
    x = torch.rand(3, 1, 28, 28)
    for name, kind in (("w.pth", "state_dict"), ("w.safetensors", "safetensors")):
        loaded = load_model(tmp_path / name, "small_cnn", None, 1, CPU)
        assert loaded.format == kind
        assert torch.allclose(loaded.module(x), cnn(x))
        save_model(loaded, tmp_path / f"out_{name}")
        assert model_format(tmp_path / f"out_{name}") == kind


class Payload:
    """Unpickling this would create a file: proof that a pickle ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": Payload(str(marker))}, path)
    with pytest.raises(InputError, match="pickled objects, which are refused"):
        load_model(path, "small_cnn", 10, 1, CPU)
    assert not marker.exists()
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Payload(str(marker)), protocol=2))
    with pytest.raises(InputError):
        load_model(tmp_path / "evil.pkl", "small_cnn", 10, 1, CPU)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"hello world, not a model", "not a TorchScript archive"),
    (b"", "not a TorchScript archive"),
])
def test_unreadable_model_files(tmp_path, content, message):
    (tmp_path / "m.pt").write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_model(tmp_path / "m.pt", "small_cnn", 10, 1, CPU)


def test_truncated_torchscript(tmp_path, cnn):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(cnn), str(path))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(InputError):
        load_model(path, None, None, 1, CPU)


def test_bare_weights_need_an_architecture_that_fits(tmp_path, cnn):
    torch.save(cnn.state_dict(), tmp_path / "w.pt")
    with pytest.raises(InputError, match="--arch"):
        load_model(tmp_path / "w.pt", None, None, 1, CPU)
    with pytest.raises(InputError, match="do not fit architecture 'resnet18'"):
        load_model(tmp_path / "w.pt", "resnet18", None, 1, CPU)
    with pytest.raises(InputError, match="unknown architecture"):
        load_model(tmp_path / "w.pt", "alexnet", None, 1, CPU)
    with pytest.raises(InputError, match="do not fit"):
        load_model(tmp_path / "w.pt", "small_cnn", 5, 1, CPU)


def test_non_tensor_state_dict_is_refused(tmp_path):
    torch.save({"a": 1}, tmp_path / "w.pt")
    with pytest.raises(InputError, match="dict of parameter name -> tensor"):
        load_model(tmp_path / "w.pt", "small_cnn", 10, 1, CPU)


def test_npz_variants(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "gray.npz", x=gray, y=np.arange(5))
    s = load_samples(tmp_path / "gray.npz")
    assert s.x.shape == (5, 1, 8, 8) and s.x.dtype == torch.float32
    assert torch.allclose(s.x[:, 0], torch.from_numpy(gray).float() / 255)
    color = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "color.npz", x=color, y=np.zeros(4, dtype=np.int32))
    s = load_samples(tmp_path / "color.npz")
    assert s.x.shape == (4, 3, 8, 8)
    assert torch.allclose(s.x[1, 2], torch.from_numpy(color[1, :, :, 2]).float() / 255)
    floats = rng.random((3, 3, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "float.npz", x=floats, y=np.zeros(3, dtype=np.int64))
    assert torch.equal(load_samples(tmp_path / "float.npz").x, torch.from_numpy(floats))


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((2, 4, 4), np.uint8)}, "arrays named x and y"),
    ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(3, np.int64)}, "2 images but y has 3"),
    ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(2, np.float32)}, "integer"),
    ({"x": np.zeros((2, 4, 4), np.float64), "y": np.zeros(2, np.int64)}, "x must be uint8"),
    ({"x": np.full((2, 1, 4, 4), 2.0, np.float32), "y": np.zeros(2, np.int64)}, r"\[0, 1\]"),
    ({"x": np.zeros((0, 4, 4), np.uint8), "y": np.zeros(0, np.int64)}, "empty"),
    ({"x": np.array([object()] * 2), "y": np.zeros(2, np.int64)}, "cannot read"),
])
def test_bad_npz(tmp_path, arrays, message):
    np.savez(tmp_path / "s.npz", **arrays)
    with pytest.raises(InputError, match=message):
        load_samples(tmp_path / "s.npz")


def image_zip(path: Path, files: dict[str, Image.Image]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, image in files.items():
            buffer = io.BytesIO()
            image.save(buffer, format="PNG" if name.endswith(".png") else "JPEG")
            z.writestr(name, buffer.getvalue())
    return path


def test_image_folder_zip(tmp_path):
    red, blue = Image.new("RGB", (6, 6), (255, 0, 0)), Image.new("RGB", (6, 6), (0, 0, 255))
    path = image_zip(tmp_path / "s.zip", {"set/cat/1.png": red, "set/ant/2.png": blue,
                                          "set/cat/3.jpg": red})
    s = load_samples(path)
    assert s.class_names == ["ant", "cat"]
    assert s.y.tolist() == [0, 1, 1] and s.x.shape == (3, 3, 6, 6)
    assert s.x[0, 2].mean() > 0.9  # the ant is blue
    s = load_samples(path, class_names=["cat", "ant"])
    assert s.y.tolist() == [1, 0, 0]
    gray = image_zip(tmp_path / "g.zip", {"a/1.png": Image.new("L", (5, 5), 128)})
    assert load_samples(gray).x.shape == (1, 1, 5, 5)


def test_bad_image_zips(tmp_path):
    img = Image.new("RGB", (6, 6))
    with pytest.raises(InputError, match="same size"):
        load_samples(image_zip(tmp_path / "a.zip", {"a/1.png": img, "b/2.png": Image.new("RGB", (7, 6))}))
    with pytest.raises(InputError, match="class folder"):
        load_samples(image_zip(tmp_path / "b.zip", {"1.png": img}))
    with pytest.raises(InputError, match="not in class_names"):
        load_samples(image_zip(tmp_path / "c.zip", {"a/1.png": img}), class_names=["b"])
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
        z.writestr("a/1.png", b"not a png")
    with pytest.raises(InputError, match="cannot decode"):
        load_samples(tmp_path / "d.zip")
    with zipfile.ZipFile(tmp_path / "e.zip", "w") as z:
        z.writestr("readme.txt", b"hi")
    with pytest.raises(InputError, match="no PNG or JPEG"):
        load_samples(tmp_path / "e.zip")
    (tmp_path / "f.bin").write_bytes(b"garbage")
    with pytest.raises(InputError, match="neither an .npz"):
        load_samples(tmp_path / "f.bin")
    with pytest.raises(InputError, match="does not exist"):
        load_samples(tmp_path / "missing.npz")
