"""ANP: Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models" (NeurIPS 2021).

Backdoor neurons are the ones whose small perturbation flips the model most easily. Every neuron
(an output channel of a BatchNorm layer) gets a mask m in [0, 1] that scales its BN weight, and
during mask training adversarial multiplicative noise: weight * (m + d_w), bias * (1 + d_b), with
d found by one signed-gradient ascent step on the clean loss within [-eps, eps]. The masks
minimise alpha * L(clean network) + (1 - alpha) * L(perturbed network) on the defender's clean
set, so they shrink on the neurons that make the network fragile. Neurons whose mask ends at or
below a threshold are pruned by zeroing their BN weight, as ANP's pruning() does: the channel
then outputs its constant bias and carries nothing of the input.

Settings are BackdoorBench's (config/defense/anp/config.yaml, defense/anp.py, anp_batchnorm.py):
anp_eps 0.4, anp_steps 1, anp_alpha 0.2, mask SGD lr 0.2 with momentum 0.9, noise SGD lr
eps / steps, batches of 256 drawn with replacement, BatchNorm in training mode while the masks
train; the pruned model is built from the original weights. Scaled down for the CPU: 300 mask
iterations instead of 2000. BackdoorBench picks the pruning threshold with the test set's ASR
(an oracle); here it is the fixed threshold 0.2 of the ANP paper.

Adaptation: ANP as published perturbs BatchNorm layers only (its code has noisy BN and, in
BackdoorBench, noisy LayerNorm; nothing for plain convolutions). A model without any BatchNorm
layer (our small CNN) gets the same mask and noise on the output channels of its Conv2d layers
instead: a conv channel, like a BN channel, is a weight part plus a bias, so m scales the weight
part and pruning zeroes that channel's filter.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import trainable_copy


@dataclass(frozen=True)
class Settings:
    iterations: int = 300  # nb_iter: 2000 in BackdoorBench and the paper
    batch_size: int = 256
    eps: float = 0.4  # anp_eps: bound of the initial random neuron noise, and its step
    steps: int = 1  # anp_steps
    alpha: float = 0.2  # anp_alpha: weight of the clean term
    lr: float = 0.2  # of the masks
    threshold: float = 0.2  # masks at or below it are pruned


FULL = Settings()
QUICK = Settings(iterations=3, batch_size=32)

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


class NeuronPerturbation(nn.Module):
    """Mask and noise for the output channels of one layer, applied by a forward hook:
    output = (m + d_w) * (layer(x) - bias) + (1 + d_b) * bias, i.e. the layer run with
    weight * (m + d_w) and bias * (1 + d_b), for BatchNorm as for a convolution."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        n, device = layer.weight.shape[0], layer.weight.device
        self.mask = nn.Parameter(torch.ones(n, device=device))
        self.noise = nn.Parameter(torch.zeros(n, device=device))
        self.noise_bias = nn.Parameter(torch.zeros(n, device=device))
        self.perturbed = False
        layer.register_forward_hook(self.hook)

    def hook(self, layer, inputs, output):
        shape = [1, -1] + [1] * (output.dim() - 2)  # broadcast over the batch and the pixels
        scale = self.mask + self.noise if self.perturbed else self.mask
        if layer.bias is None:
            return scale.view(shape) * output
        bias = layer.bias.view(shape)
        bias_scale = (1 + self.noise_bias).view(shape) if self.perturbed else 1.0
        return scale.view(shape) * (output - bias) + bias_scale * bias

    def randomise_noise(self, eps: float, rng: torch.Generator) -> None:
        with torch.no_grad():
            for noise in (self.noise, self.noise_bias):  # drawn on the CPU, copied to the device
                noise.copy_((torch.rand(noise.shape, generator=rng) * 2 - 1) * eps)


def neuron_layers(model: nn.Module) -> list[str]:
    """Names of the layers whose channels ANP masks: the BatchNorm layers, or the convolutions
    of a model without BatchNorm."""
    names = [name for name, m in model.named_modules() if isinstance(m, BATCH_NORMS)]
    return names or [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def optimise_masks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Settings,
                   rng: torch.Generator) -> dict[str, torch.Tensor]:
    """Trains the neuron masks on a throwaway copy of ``model``; returns each layer's mask."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    names = neuron_layers(model)
    neurons = [NeuronPerturbation(model.get_submodule(name)) for name in names]
    mask_opt = torch.optim.SGD([n.mask for n in neurons], lr=s.lr, momentum=0.9)
    noises = [p for n in neurons for p in (n.noise, n.noise_bias)]
    noise_opt = torch.optim.SGD(noises, lr=s.eps / s.steps)

    def perturb(on: bool) -> None:
        for n in neurons:
            n.perturbed = on

    model.train()
    for _ in range(s.iterations):
        idx = torch.randint(0, len(x), (s.batch_size,), generator=rng)
        xb, yb = x[idx], y[idx]
        # 1. The adversarial neuron perturbation: signed ascent on the clean loss from a random start.
        for n in neurons:
            n.randomise_noise(s.eps, rng)
        perturb(True)
        for _ in range(s.steps):
            noise_opt.zero_grad()
            (-F.cross_entropy(model(xb), yb)).backward()
            for p in noises:
                p.grad.sign_()
            noise_opt.step()
        # 2. The masks: keep the perturbed network right as well as the clean one.
        mask_opt.zero_grad()
        robust = F.cross_entropy(model(xb), yb)
        perturb(False)
        natural = F.cross_entropy(model(xb), yb)
        (s.alpha * natural + (1 - s.alpha) * robust).backward()
        mask_opt.step()
        with torch.no_grad():
            for n in neurons:
                n.mask.clamp_(0, 1)
    return {name: n.mask.detach().clone() for name, n in zip(names, neurons)}


def prune(model: nn.Module, masks: dict[str, torch.Tensor], threshold: float) -> nn.Module:
    """A copy of ``model`` with the weight of every channel whose mask is <= threshold zeroed."""
    model = trainable_copy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_submodule(name).weight[mask <= threshold] = 0
    return model.eval()


def defend(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, seed: int = 0,
           quick: bool = False) -> tuple[nn.Module, dict]:
    s = QUICK if quick else FULL
    masks = optimise_masks(model, x, y, s, torch.Generator().manual_seed(seed))
    return prune(model, masks, s.threshold), {}
