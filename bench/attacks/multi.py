"""Two backdoors in one model: BadNets' white square (Gu et al. 2017) in the bottom-right corner
sends images to one target, a checkerboard in the top-left corner to another. Each trigger
poisons half of the poisoned share; the defense has to find and erase both."""

import torch

from .badnets import BadNets
from .base import Attack


class MultiTrigger(Attack):
    name = "multi"

    def __init__(self, targets: tuple[int, int] = (0, 1), size: int = 3, **kwargs):
        # ``target`` is the first trigger's, for callers that read a single target.
        super().__init__(target=targets[0], **kwargs)
        self.targets, self.size = tuple(targets), size
        self.square = BadNets(size=size)

    def checkerboard(self, x: torch.Tensor) -> torch.Tensor:
        cells = torch.arange(self.size, device=x.device)
        x = x.clone()
        x[..., 1:1 + self.size, 1:1 + self.size] = ((cells[:, None] + cells) % 2 == 0).to(x.dtype)
        return x

    def triggers(self):
        return [(self.square.apply, self.targets[0]), (self.checkerboard, self.targets[1])]
