"""Data sets the bench and the tests build backdoored models from; none is fetched at run time."""

import gzip
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 (N, 1, 28, 28) in [0, 1], labels as int64."""
    prefix = "train" if split == "train" else "t10k"
    images = FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(
            f"{images} is missing: apt-get install dataset-fashion-mnist"
        )
    x = read_idx(images)
    y = read_idx(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz")
    return torch.from_numpy(x.copy()).float().div_(255).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, upscaled to 16x16: a tiny set for fast tests."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images).float().div_(16).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=16, mode="nearest")
    return x, torch.from_numpy(data.target.astype(np.int64))


def cifar10_dir() -> Path:
    """../shared/data/cifar10 beside the checkout (JPEG class-folder zips), or $BAERASE_CIFAR10_DIR."""
    import os

    return Path(os.environ.get("BAERASE_CIFAR10_DIR",
                               Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"))


def cifar10(split: str = "train", cache: Path = Path(".cache/bench")) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 as float32 (N, 3, 32, 32) in [0, 1] and int64 labels (sorted folder names give the
    standard label order). The JPEGs are decoded once and kept as uint8 in ``cache``."""
    import io
    import zipfile

    from PIL import Image

    cached = cache / f"cifar10-{split}.npz"
    if not cached.exists():
        source = cifar10_dir() / f"{split}.zip"
        if not source.exists():
            raise FileNotFoundError(f"{source} is missing: CIFAR-10 lives in shared/data/cifar10")
        with zipfile.ZipFile(source) as archive:
            names = sorted(n for n in archive.namelist() if n.lower().endswith((".jpg", ".jpeg", ".png")))
            classes = sorted({Path(n).parent.name for n in names})
            images = np.stack([np.asarray(Image.open(io.BytesIO(archive.read(n))).convert("RGB"))
                               for n in names])
            labels = np.array([classes.index(Path(n).parent.name) for n in names], np.int64)
        # A fixed shuffle: the zip is sorted by class, and the defender's share is the last 5%.
        order = np.random.default_rng(0).permutation(len(labels))
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cached, x=images[order], y=labels[order])
    with np.load(cached) as data:
        x, y = data["x"], data["y"]
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255), torch.from_numpy(y)
