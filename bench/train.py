"""Training (backdoored) classifiers for the bench and the tests."""

import torch
import torch.nn.functional as F

from worker.sanitize.architectures import build_model


def fit(model, optimizer, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, seed: int = 0,
        schedule=None, augment=None, mixed_precision: bool = False):
    """Minibatch cross-entropy training in a seeded shuffled order; returns the model in eval mode.
    ``augment(batch, generator)`` transforms each batch (random crops and flips for colour images);
    ``mixed_precision`` runs the forward pass in bfloat16 on a GPU."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            optimizer.zero_grad()
            batch = x[idx] if augment is None else augment(x[idx], g)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mixed_precision):
                loss = F.cross_entropy(model(batch), y[idx])
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
    return model.eval()


def crop_and_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation: a random crop of the zero-padded batch and a random
    horizontal flip (one crop offset per batch, flips per image)."""
    h, w = x.shape[-2:]
    top, left = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    x = F.pad(x, (pad, pad, pad, pad))[..., top:top + h, left:left + w]
    flip = (torch.rand(len(x), generator=g) < 0.5).to(x.device)  # drawn on the CPU on any device
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def train_classifier(arch: str, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                     epochs: int = 3, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                     augment=None):
    """A model of ``arch`` trained on (x, y), on the device the images are on."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=num_classes, in_channels=x.shape[1]).to(x.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(x) // batch_size)
    # A cosine schedule lets a short training end near the accuracy a longer one reaches.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if augment else None
    # Victims on a GPU train in bfloat16 mixed precision, as GPU training usually does (the CIFAR-10
    # suite trains twelve 30-epoch VGG-11s); the defenses' own fine-tuning, like the engine, stays
    # in float32, so no defense is measured at another precision than ours.
    return fit(model, optimizer, x, y, epochs, batch_size, seed, schedule, augment,
               mixed_precision=x.device.type == "cuda")


def backdoored_fashion_mnist(arch: str, attack, train_size: int, epochs: int, seed: int = 0):
    """A classifier trained on the first ``train_size`` Fashion-MNIST training images, poisoned
    by ``attack`` (None: a clean model). Returns the model in eval mode."""
    from .datasets import fashion_mnist

    x, y = fashion_mnist("train")
    x, y = x[:train_size], y[:train_size]
    if attack is not None:
        x, y = attack.poison(x, y)
    return train_classifier(arch, x, y, num_classes=10, epochs=epochs, seed=seed)


def save_samples(path, x: torch.Tensor, y: torch.Tensor) -> None:
    """Writes clean samples as the .npz the service accepts (uint8 (N, H, W[, C]) and labels)."""
    import numpy as np

    images = (x * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    if images.shape[-1] == 1:
        images = images[..., 0]
    np.savez_compressed(path, x=images, y=y.cpu().numpy())
