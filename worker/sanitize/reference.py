"""The reference model: a small model of the uploaded one's family trained on the defender's
clean samples alone.

Some classes are easy to reach in any model trained on their data (Fashion-MNIST's "bag": a
dozen bright pixels in the right place flip most images to it). Their triggers are features of
the data, not implants, and a model that never saw poisoned data responds to them too: it needs
only a few times more of a natural trigger, and 20 to 270 times more of an implanted
one, or never flips at all (detection.py, docs/method.md section 3).

What is easy depends on the family, though: a perceptron's ordinary classes flip at a dozen pixels
that a CNN needs 7 to 40 times more of, so a dense model (retuning.model_kind) is measured against a
perceptron, and every other one against the small CNN.
"""

import time

import torch
import torch.nn.functional as F

from .architectures import build_model


def reference_architecture(kind: str) -> str:
    """The architecture (architectures.py) of the reference for a model of ``kind``."""
    return "mlp" if kind == "dense" else "small_cnn"


def train_reference(x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int, seed: int, arch: str,
                    batch_size: int = 64, lr: float = 1e-3) -> torch.nn.Module:
    """A model of ``arch`` trained with Adam on (x, y), returned in eval mode with its parameters
    frozen."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes, x.shape[1]).to(x.device)
    if x.device.type == "cpu":  # a fifth faster on a CPU (pipeline.for_search says why)
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train_epochs(model, optimizer, x, y, epochs, batch_size, torch.Generator().manual_seed(seed))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train_epochs(model, optimizer, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int,
                 generator: torch.Generator) -> None:
    """Minibatch cross-entropy in training mode, in an order ``generator`` shuffles; leaves the
    model in eval mode."""
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(batch_size):
            idx = idx.to(x.device)
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    model.eval()


class LazyReference:
    """The reference model, trained on first use: detection needs it for its own triggers where the
    excess is fitted (detection.excesses), and elsewhere only for a class whose log ratio alone
    reaches the suspicious line; a model without one never pays for it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int, seed: int, kind: str):
        self.arguments = (x, y, num_classes, epochs, seed, reference_architecture(kind))
        self.model: torch.nn.Module | None = None
        self.seconds = 0.0  # training time, 0 while untrained
        # The log ratios of its own smallest triggers, per family: searched once (pipeline.detect),
        # the same for the model as uploaded and after unlearning.
        self.log_ratios: dict[str, list[float]] | None = None

    def get(self) -> torch.nn.Module:
        if self.model is None:
            started = time.perf_counter()
            self.model = train_reference(*self.arguments)
            self.seconds = time.perf_counter() - started
        return self.model
