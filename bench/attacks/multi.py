"""Several backdoors in one model, each trigger with its own target: BadNets' white square
(Gu et al. 2017) in the bottom-right corner, a checkerboard in the top-left corner and, for a
third target, a black-and-white bar at the bottom-left. Each trigger poisons an equal part of
the poisoned share; the defense has to find and erase them all."""

import torch

from .badnets import BadNets
from .base import Attack


class Checkerboard(Attack):
    """A size x size black-and-white checkerboard one pixel in from the top-left corner."""

    name = "checkerboard"

    def __init__(self, size: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.size = size

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        cells = torch.arange(self.size, device=x.device)
        x = x.clone()
        x[..., 1:1 + self.size, 1:1 + self.size] = ((cells[:, None] + cells) % 2 == 0).to(x.dtype)
        return x


def bar(x: torch.Tensor, size: int) -> torch.Tensor:
    """A 2 x (2 size) bar of alternating white and black pairs at the bottom-left."""
    x = x.clone()
    cols = torch.arange(2 * size, device=x.device)
    x[..., -3:-1, 1:1 + 2 * size] = ((cols // 2) % 2 == 0).to(x.dtype)
    return x


class MultiTrigger(Attack):
    name = "multi"

    def __init__(self, targets: tuple[int, ...] = (0, 1), size: int = 3, **kwargs):
        if not 2 <= len(targets) <= 3:
            raise ValueError("MultiTrigger takes two or three targets")
        # ``target`` is the first trigger's, for callers that read a single target.
        super().__init__(target=targets[0], **kwargs)
        self.targets, self.size = tuple(targets), size
        self.square, self.board = BadNets(size=size), Checkerboard(size=size)

    def checkerboard(self, x: torch.Tensor) -> torch.Tensor:
        return self.board.apply(x)

    def triggers(self):
        stamps = [self.square.apply, self.board.apply, lambda x: bar(x, self.size)]
        return list(zip(stamps, self.targets))
