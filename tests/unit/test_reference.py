"""The reference model: a small model of the uploaded one's family trained on the clean samples
alone, frozen, reproducible."""

import pytest
import torch

from worker.sanitize.reference import LazyReference, reference_architecture, train_reference


def bright_or_dark(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.3 * torch.rand(n, 1, 10, 10, generator=g) + 0.6 * y.view(-1, 1, 1, 1)
    return x, y


@pytest.mark.parametrize("arch", ["small_cnn", "mlp"])
def test_the_reference_learns_the_samples_and_comes_back_frozen(arch):
    x, y = bright_or_dark(200, seed=0)
    reference = train_reference(x, y, num_classes=2, epochs=30, seed=0, arch=arch)
    x_test, y_test = bright_or_dark(100, seed=1)
    with torch.no_grad():
        assert (reference(x_test).argmax(1) == y_test).float().mean() > 0.9
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())


def test_the_same_seed_gives_the_same_reference():
    x, y = bright_or_dark(100, seed=0)
    first, second = (train_reference(x, y, num_classes=2, epochs=1, seed=3, arch="small_cnn") for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


def test_the_lazy_reference_trains_once_and_only_when_asked():
    x, y = bright_or_dark(100, seed=0)
    reference = LazyReference(x, y, num_classes=2, epochs=1, seed=3, kind="dense")
    assert reference.model is None and reference.seconds == 0.0
    first = reference.get()
    assert reference.get() is first and reference.seconds > 0
    eager = train_reference(x, y, num_classes=2, epochs=1, seed=3, arch="mlp")
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), eager.parameters()))


def test_a_dense_model_is_measured_against_a_perceptron_and_any_other_against_the_small_cnn():
    # What a perceptron finds easy a CNN may not: judged against a CNN, clean perceptrons'
    # ordinary classes looked implanted (docs/population.md, twenty-third sitting).
    assert reference_architecture("dense") == "mlp"
    assert reference_architecture("plain") == reference_architecture("batchnorm") == "small_cnn"
