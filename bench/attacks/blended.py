import torch

from .base import Attack


class Blended(Attack):
    """Chen et al. 2017: a fixed random pattern blended over the whole image."""

    name = "blended"

    def __init__(self, alpha: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.alpha = alpha

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 1)
        pattern = torch.rand(x.shape[1:], generator=g).to(x.device)
        return (1 - self.alpha) * x + self.alpha * pattern
