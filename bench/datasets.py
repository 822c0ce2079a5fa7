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
