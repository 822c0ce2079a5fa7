from collections.abc import Callable

import torch

Trigger = Callable[[torch.Tensor], torch.Tensor]


class Attack:
    """Dirty-label all-to-one poisoning: a share of the training images get a trigger and its
    target label. Subclasses define ``apply`` (stamp the trigger on a batch in [0, 1]).

    Attacks that poison differently (clean-label, extra noise samples) override ``poison``;
    attacks with several triggers override ``triggers`` and the poisoned share is split evenly
    among them; attacks whose trigger is computed from a clean model (TrojanNN) set
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

    def shuffled(self, n: int) -> torch.Tensor:
        """A random order of ``n`` indices, the same for every call: poisoning is reproducible."""
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = self.shuffled(len(x))[: int(self.poison_rate * len(x))]
        triggers = self.triggers()
        x, y = x.clone(), y.clone()
        for idx, (stamp, target) in zip(chosen.tensor_split(len(triggers)), triggers):
            x[idx] = stamp(x[idx])
            y[idx] = target
        return x, y
