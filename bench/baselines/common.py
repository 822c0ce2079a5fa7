"""Steps several baseline defenses share."""

import copy

import torch
from torch import nn

from ..train import fit


def trainable_copy(model: nn.Module) -> nn.Module:
    """A copy the defense may change; the model it was given stays as it was. Copied without
    autograd: a TorchScript module's copy would otherwise hold its parameters as non-leaf clones
    that no optimiser takes (BAERASE's output is one, and the bench re-tunes it)."""
    with torch.no_grad():
        model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def fine_tune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 0.01,
              batch_size: int = 128, weight_decay: float = 5e-4, seed: int = 0) -> nn.Module:
    """SGD (momentum 0.9, cosine schedule) on the defender's clean set, BatchNorm in training
    mode, as BackdoorBench fine-tunes. Changes ``model`` in place and returns it in eval mode."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    return fit(model, opt, x, y, epochs, batch_size, seed, schedule)


# FT, FP and NC all end with BackdoorBench's fine-tuning (config/defense/{ft,fp,nc}/config.yaml:
# epochs 100, batch_size 256, SGD lr 0.01 momentum 0.9 wd 5e-4, CosineAnnealingLR; fine_tune's
# defaults hold the rest). Only the epochs are scaled down, for two shared CPU cores: 100 epochs
# over 3,000 images takes minutes per defense on a small CNN, and the bench runs dozens.
FINE_TUNE_EPOCHS = 20
FINE_TUNE_BATCH = 256
