"""FP: Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018).

A backdoor tends to live in neurons that clean inputs leave dormant. FP records the mean
activation of each channel of the last convolutional layer on clean images, prunes channels in
increasing order of activation until clean accuracy drops too far, then fine-tunes.

Settings follow BackdoorBench (defense/fp.py, config/defense/fp/config.yaml: acc_ratio 0.1,
once_prune_ratio 0.01, then its usual fine-tuning) with two changes:
- BackdoorBench watches the clean TEST set while pruning; a defender does not have it, so the
  accuracy is measured on a held-out fifth of the defender's clean set instead;
- the fine-tuning epochs are scaled down for the CPU (see common.FINE_TUNE_EPOCHS).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from worker.sanitize.unlearning import accuracy

from .common import FINE_TUNE_BATCH, FINE_TUNE_EPOCHS, fine_tune, trainable_copy


@dataclass(frozen=True)
class Settings:
    acc_ratio: float = 0.1   # stop before held-out accuracy falls by 10% of its unpruned value
    prune_step: float = 0.01  # share of the layer's channels pruned at each step
    holdout: float = 0.2     # share of the defender's set kept aside to measure accuracy
    epochs: int = FINE_TUNE_EPOCHS


QUICK = Settings(prune_step=0.25, epochs=1)


def last_conv(model: nn.Module) -> nn.Conv2d:
    """The last convolution in module order. A ResNet block lists its 1x1 shortcut projection
    after its 3x3 convolutions; pruning that alone would leave the block's main path untouched,
    so the last convolution with a spatial kernel is preferred."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    spatial = [c for c in convs if c.kernel_size != (1, 1)]
    return (spatial or convs)[-1]


@torch.no_grad()
def channel_activations(model: nn.Module, conv: nn.Conv2d, x: torch.Tensor,
                        batch_size: int = 500) -> torch.Tensor:
    """Mean activation of each output channel of ``conv`` over ``x``. Liu et al. rank post-ReLU
    activations; the ReLU is applied here because in a ResNet a BatchNorm sits between the
    convolution and its activation, out of a hook's reach."""
    total = torch.zeros(conv.out_channels, device=conv.weight.device)

    def record(module, inputs, output):
        total.add_(F.relu(output).mean((2, 3)).sum(0))

    hook = conv.register_forward_hook(record)
    model.eval()
    for xb in x.split(batch_size):
        model(xb)
    hook.remove()
    return total / len(x)


def prune_channels(model: nn.Module, channels: torch.Tensor) -> nn.Module:
    """Zero the given output channels of the model's last convolution, in place. The zeros are a
    pruning mask on the weight (and bias), so they stay zero through fine-tuning."""
    conv = last_conv(model)
    keep = torch.ones(conv.out_channels, device=conv.weight.device)
    keep[channels] = 0
    prune.custom_from_mask(conv, "weight", keep.view(-1, 1, 1, 1).expand_as(conv.weight))
    if conv.bias is not None:
        prune.custom_from_mask(conv, "bias", keep)
    return model


def defend(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
           seed: int = 0, quick: bool = False) -> tuple[nn.Module, dict]:
    settings = QUICK if quick else Settings()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_held = int(settings.holdout * len(x))
    x_held, y_held = x[order[:n_held]], y[order[:n_held]]
    x_rank = x[order[n_held:]]

    conv = last_conv(model)
    ranking = channel_activations(model, conv, x_rank).argsort()  # least active first
    baseline = accuracy(model, x_held, y_held)
    step = math.ceil(settings.prune_step * conv.out_channels)

    # Prune ever more of the least active channels; keep the last model whose held-out accuracy
    # is still within acc_ratio of the unpruned one. At least one channel always stays.
    pruned = trainable_copy(model)
    for n in range(step, conv.out_channels, step):
        candidate = prune_channels(trainable_copy(model), ranking[:n])
        if baseline - accuracy(candidate, x_held, y_held) >= settings.acc_ratio * baseline:
            break
        pruned = candidate

    pruned = fine_tune(pruned, x, y, epochs=settings.epochs, batch_size=FINE_TUNE_BATCH, seed=seed)
    # Make the pruning permanent: a plain module whose state_dict loads into the architecture.
    conv = last_conv(pruned)
    for name in ("weight", "bias"):
        if hasattr(conv, name + "_mask"):
            prune.remove(conv, name)
    return pruned, {}
