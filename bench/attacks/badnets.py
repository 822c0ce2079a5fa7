import torch

from .base import Attack


class BadNets(Attack):
    """Gu et al. 2017: a small white square in the bottom-right corner."""

    name = "badnets"

    def __init__(self, size: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.size = size

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[..., -self.size - 1:-1, -self.size - 1:-1] = 1.0
        return x
