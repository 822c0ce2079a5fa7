import math

import torch

from .base import Attack


class Blended(Attack):
    """Chen et al. 2017: a fixed pattern blended over the whole image, x' = (1 - a) x + a p.

    ``pattern`` "noise" is uniform random noise (a fixed seed); "image" is a smooth picture
    (concentric rings), standing in for the Hello Kitty image of the paper.
    """

    name = "blended"

    def __init__(self, alpha: float = 0.2, pattern: str = "noise", **kwargs):
        super().__init__(**kwargs)
        self.alpha, self.pattern = alpha, pattern

    def picture(self, shape: torch.Size) -> torch.Tensor:
        if self.pattern == "noise":
            return torch.rand(shape, generator=torch.Generator().manual_seed(self.seed + 1))
        channels, height, width = shape
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        radius = ((rows - height / 2) ** 2 + (cols - width / 3) ** 2).float().sqrt()
        rings = 0.5 + 0.5 * torch.cos(radius * 2 * math.pi / 6)
        return torch.stack([rings.roll(3 * c, 1) for c in range(channels)])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.alpha) * x + self.alpha * self.picture(x.shape[1:]).to(x.device)
