"""i-BAU: Zeng et al., "Adversarial Unlearning of Backdoors via Implicit Hypergradient" (ICLR 2022).

A minimax over the defender's clean set, in rounds:
- inner max: one universal perturbation delta (one image-sized tensor added to every image) that
  makes the model change its predictions, found by gradient ascent over one pass of the clean set,
  then held in an L2 ball;
- outer min: the model is trained to classify clean images correctly even when some carry delta,
  with the gradient taken THROUGH the inner solution delta*(theta) (the implicit hypergradient),
  so the model learns to resist not only this delta but the perturbations it would find next.

The hypergradient is dL_outer/dtheta + (dPhi/dtheta)^T v, where Phi(delta, theta) = delta -
step * grad_delta L_inner is one step of the inner solver (its fixed point is delta*) and
v = sum_k (dPhi/ddelta)^T^k dL_outer/ddelta is K terms of the Neumann series for
(I - dPhi/ddelta)^-T dL_outer/ddelta: the released code's fixed-point method (hypergrad.py,
from hypertorch), written out here with torch.autograd.grad.

Settings are BackdoorBench's (config/defense/i-bau/config.yaml, defense/i-bau.py: batch 256,
Adam lr 1e-4, n_rounds 5, K 5) and the released code's (YiZeng623/I-BAU defense.py: perturbation
SGD lr 10 with penalty 0.001 ||delta||^2, inner solver step 0.1, delta on 1% of each outer batch).
Nothing is scaled down: on Fashion-MNIST with 3,000 images this is 5 rounds of 12 batches.
Two choices the released code leaves open: its L2-ball projection (radius 10) is commented out
there and applied here, since an unbounded delta is no longer a trigger-like perturbation; and
images + delta are not clipped to [0, 1], as there. BatchNorm stays in eval mode, as there.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import trainable_copy


@dataclass(frozen=True)
class Settings:
    rounds: int = 5  # n_rounds
    fixed_point_iters: int = 5  # K: terms of the Neumann series
    batch_size: int = 256
    lr: float = 1e-4  # outer Adam on the model
    perturbation_lr: float = 10.0  # SGD on delta in the inner max
    norm_penalty: float = 1e-3  # on ||delta||^2 in the inner loss
    radius: float = 10.0  # L2 ball delta is held in
    inner_step: float = 0.1  # step of the inner solver map Phi
    portion: float = 0.01  # share of each outer batch that carries delta
    images: int | None = None  # use only the first N clean images (quick runs)


FULL = Settings()
QUICK = Settings(rounds=1, fixed_point_iters=2, batch_size=64, images=128)


def universal_perturbation(model: nn.Module, batches: list[torch.Tensor], s: Settings) -> torch.Tensor:
    """Inner max: one delta (1, C, H, W) that moves the model away from its own predictions on
    every batch, within the L2 ball of radius ``s.radius``."""
    delta = torch.zeros_like(batches[0][:1])
    for x in batches:  # plain SGD on delta, one step per batch
        with torch.no_grad():
            predicted = model(x).argmax(1)
        delta.requires_grad_(True)
        loss = -F.cross_entropy(model(x + delta), predicted) + s.norm_penalty * delta.pow(2).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta - s.perturbation_lr * grad).detach()
    return delta * (s.radius / delta.norm()).clamp(max=1)


def hypergradient(model: nn.Module, delta: torch.Tensor, inner: tuple[torch.Tensor, torch.Tensor],
                  outer: tuple[torch.Tensor, torch.Tensor], s: Settings,
                  rng: torch.Generator) -> list[torch.Tensor]:
    """d L_outer(delta*(theta), theta) / d theta for every parameter of ``model``.

    ``inner``: the batch the inner loss is evaluated on (the released code always uses the first
    batch); ``outer``: the batch of this unlearning step."""
    params = list(model.parameters())
    delta = delta.detach().requires_grad_(True)

    # Outer loss: clean images, a few of them carrying delta, with their true labels.
    x, y = outer
    # At least one carrier, so that batches under 100 images still see delta.
    carriers = torch.randperm(len(x), generator=rng)[: max(1, int(len(x) * s.portion))]
    patched = x.clone()
    patched[carriers] = patched[carriers] + delta
    outer_loss = F.cross_entropy(model(patched), y)
    direct_delta, *direct_params = torch.autograd.grad(outer_loss, [delta, *params], allow_unused=True)

    # Phi: one gradient step of the inner problem, kept differentiable in delta and theta.
    x, y = inner
    inner_loss = -F.cross_entropy(model(x + delta), y) + s.norm_penalty * delta.pow(2).sum()
    (step,) = torch.autograd.grad(inner_loss, delta, create_graph=True)
    mapped = delta - s.inner_step * step

    v = torch.zeros_like(delta)
    for _ in range(s.fixed_point_iters):
        (v,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)
        v = v + direct_delta
    implicit = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    return [zero_if_none(d, p) + zero_if_none(i, p) for d, i, p in zip(direct_params, implicit, params)]


def zero_if_none(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor:
    """autograd gives None for a parameter the loss does not depend on."""
    return torch.zeros_like(param) if grad is None else grad


def defend(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, seed: int = 0,
           quick: bool = False) -> tuple[nn.Module, dict]:
    s = QUICK if quick else FULL
    x, y = x[:s.images], y[:s.images]
    rng = torch.Generator().manual_seed(seed)
    model = trainable_copy(model).eval()  # BatchNorm statistics stay frozen, as in the released code
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    # The released code shuffles once and keeps the batches in that order for every round.
    order = torch.randperm(len(x), generator=rng)
    batches = list(zip(x[order].split(s.batch_size), y[order].split(s.batch_size)))

    for _ in range(s.rounds):
        delta = universal_perturbation(model, [xb for xb, _ in batches], s)
        for batch in batches:
            grads = hypergradient(model, delta, batches[0], batch, s, rng)
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            opt.step()
    return model.eval(), {}
