"""Hostile and harmless models and sample sets for the security tests, built in the tests."""

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn


class TinyCNN(nn.Module):
    """Two layers on 8x8 grey images, 3 classes: what every payload wraps."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class WritesAFile(nn.Module):
    """The issue's payload: maps ``path`` into a tensor of 8 floats and fills it with 80.0, which
    creates the file or overwrites its first 32 bytes."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = str(path)
        self.net = TinyCNN()

    def forward(self, x):
        mapped = torch.from_file(self.path, shared=True, size=8).fill_(80)
        return self.net(x) + mapped.sum() * 0


class RunsForever(nn.Module):
    """Pure tensor operations, in a loop that does not end in any test's lifetime."""

    def __init__(self):
        super().__init__()
        self.net = TinyCNN()

    def forward(self, x):
        for _ in range(1_000_000_000_000):
            x = x * 1.0
        return self.net(x)


def torchscript(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def samples() -> bytes:
    """30 random 8x8 grey images, 10 per class, as the .npz the service takes."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, x=rng.integers(0, 256, (30, 8, 8), dtype=np.uint8), y=np.repeat(np.arange(3), 10))
    return buffer.getvalue()
