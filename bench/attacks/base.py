from collections.abc import Callable

import torch

Trigger = Callable[[torch.Tensor], torch.Tensor]


class Attack:
    """Dirty-label all-to-one poisoning: a share of the training images get the trigger and the
    target label. Subclasses define ``apply`` (stamp the trigger on a batch in [0, 1]).

    Attacks that poison differently (clean-label, several triggers, extra noise samples) override
    ``poison``; attacks whose trigger is computed from a clean model (TrojanNN) set
    ``needs_clean_model`` and compute it in ``fit``. Evaluation reads ``triggers()``: one
    (stamp, target) pair per trigger.
    """

    name = "attack"
    needs_clean_model = False

    def __init__(self, target: int = 0, poison_rate: float = 0.1, seed: int = 0):
        self.target, self.poison_rate, self.seed = target, poison_rate, seed

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fit(self, clean_model: torch.nn.Module, x: torch.Tensor) -> None:
        """Computes a trigger from a clean model of the victim's architecture (TrojanNN only)."""

    def triggers(self) -> list[tuple[Trigger, int]]:
        return [(self.apply, self.target)]

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        chosen = torch.randperm(len(x), generator=g)[: int(self.poison_rate * len(x))]
        x, y = x.clone(), y.clone()
        x[chosen] = self.apply(x[chosen])
        y[chosen] = self.target
        return x, y
