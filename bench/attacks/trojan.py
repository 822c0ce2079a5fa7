"""TrojanNN: Liu et al., "Trojaning Attack on Neural Networks", NDSS 2018.

The trigger is not chosen by hand: it is optimised, inside a fixed square mask, to strongly excite
a few neurons of a clean model of the victim's architecture. TrojanNN picks the neurons of an
inner layer that are most connected to the next layer; we take the inputs of the model's last
``nn.Linear`` (the penultimate features, which every built-in architecture has) and pick the
units with the largest summed absolute outgoing weight. Then, as BackdoorBench does, the victim
is trained from scratch on data poisoned dirty-label with that trigger.
"""

import torch
from torch import nn

from .base import Attack


class TrojanNN(Attack):
    name = "trojan"
    needs_clean_model = True

    def __init__(self, neurons: int = 2, steps: int = 300, lr: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.neurons, self.steps, self.lr = neurons, steps, lr
        self.pattern = None  # (C, side, side) in [0, 1], set by fit

    @staticmethod
    def square(height: int) -> tuple[slice, slice]:
        """The mask: a square of side 20% of the image (6 px at 28 or 32 px), near the top-left
        corner so that it never overlaps BadNets' bottom-right square."""
        side, offset = max(2, round(0.2 * height)), max(1, round(height / 14))
        return slice(offset, offset + side), slice(offset, offset + side)

    def stamp(self, x: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        rows, cols = self.square(x.shape[-2])
        x = x.clone()
        x[..., rows, cols] = pattern
        return x

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern is None:
            raise RuntimeError("TrojanNN has no trigger yet: call fit(clean_model, x) first")
        return self.stamp(x, self.pattern.to(x.device))

    def chosen_neurons(self, model: nn.Module) -> tuple[nn.Linear, torch.Tensor]:
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        return last, last.weight.abs().sum(0).topk(self.neurons).indices

    def activations(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The chosen neurons' values on ``x``, shape (N, neurons)."""
        last, neurons = self.chosen_neurons(model)
        captured = []
        hook = last.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        try:
            model(x)
        finally:
            hook.remove()
        return captured[0][:, neurons]

    def fit(self, clean_model: nn.Module, x: torch.Tensor) -> None:
        clean_model.eval()
        rows, cols = self.square(x.shape[-2])
        side = rows.stop - rows.start
        g = torch.Generator().manual_seed(self.seed)
        pattern = torch.rand(x.shape[1], side, side, generator=g).to(x.device).requires_grad_()
        opt = torch.optim.Adam([pattern], lr=self.lr)
        batch = x[:64]  # stamped on real images, so the pattern excites the neurons on any input
        for _ in range(self.steps):
            # Pixels are bounded, so maximising the activations directly has a well-defined end;
            # autograd.grad leaves the clean model's own .grad untouched.
            loss = -self.activations(clean_model, self.stamp(batch, pattern)).mean()
            (pattern.grad,) = torch.autograd.grad(loss, pattern)
            opt.step()
            with torch.no_grad():
                pattern.clamp_(0, 1)
        self.pattern = pattern.detach()
