import torch

from .base import Attack


class TrojanWatermark(Attack):
    """A TrojanNN-style watermark: a fixed 6x6 binary pattern stamped in a fixed square
    (top-left, away from the BadNets corner)."""

    name = "trojan"

    def __init__(self, size: int = 6, **kwargs):
        super().__init__(**kwargs)
        self.size = size

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 2)
        mark = (torch.rand(self.size, self.size, generator=g) > 0.5).float().to(x.device)
        x = x.clone()
        x[..., 2:2 + self.size, 2:2 + self.size] = mark
        return x
