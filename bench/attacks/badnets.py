import torch

from .base import Attack


def square_at(height: int, width: int, size: int, position: str) -> tuple[slice, slice]:
    """Rows and columns of a size x size square one pixel in from a corner ("corner": bottom
    right), the middle of the right edge ("edge"), or the image's centre ("centre")."""
    if position == "corner":
        top, left = height - size - 1, width - size - 1
    elif position == "edge":
        top, left = (height - size) // 2, width - size - 1
    elif position == "centre":
        top, left = (height - size) // 2, (width - size) // 2
    else:
        raise ValueError(f"unknown position {position!r}: corner, edge or centre")
    return slice(top, top + size), slice(left, left + size)


class BadNets(Attack):
    """Gu et al. 2017: a small square of one colour; by default white, in the bottom-right corner.

    ``colour`` is "white", "black" or "random" (one fixed random colour per pixel and channel).
    """

    name = "badnets"

    def __init__(self, size: int = 3, position: str = "corner", colour: str = "white", **kwargs):
        super().__init__(**kwargs)
        self.size, self.position, self.colour = size, position, colour

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = square_at(x.shape[-2], x.shape[-1], self.size, self.position)
        x = x.clone()
        if self.colour == "random":
            g = torch.Generator().manual_seed(self.seed + 5)
            x[..., rows, cols] = torch.rand(x.shape[1], self.size, self.size, generator=g).to(x.device)
        else:
            x[..., rows, cols] = 1.0 if self.colour == "white" else 0.0
        return x
