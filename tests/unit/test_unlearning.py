"""The unlearning loss and its guards."""

import math

import torch
from torch import nn

from worker.sanitize.config import RecoveryConfig, UnlearningConfig
from worker.sanitize.recovery import MaskFamily, RecoveredTrigger, TriggerGenerator
from worker.sanitize.unlearning import unlearn, unlearning_loss


def loss(model, triggers, x, y, k, anchor=(), l1=0.0):
    """The loss with the true labels as the soft targets (a teacher that is always right)."""
    targets = nn.functional.one_hot(y, k).float()
    return unlearning_loss(model, triggers, x, y, targets, k, list(anchor), l1)


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def trigger(target: int, shape=(1, 4, 4)) -> RecoveredTrigger:
    family = MaskFamily(shape)
    return RecoveredTrigger(target, family, TriggerGenerator(1, 12, 8, family.dim), asr=1.0,
                            size=0.5, penalty=1.0)


def test_ascent_is_bounded_once_the_target_is_no_likelier_than_chance():
    x, y = torch.rand(8, 1, 4, 4), torch.ones(8, dtype=torch.long)
    k = 4
    # Target 0 already below 1/K: the ascent term adds nothing; only the two CE terms remain.
    below = FixedLogits([-5.0, 5.0, 0.0, 0.0])
    ce = nn.functional.cross_entropy(below(x), y)
    total = loss(below, [trigger(0)], x, y, k)
    assert math.isclose(total.item(), 2 * ce.item(), rel_tol=1e-5)
    # Target 0 likely: the ascent term is positive and pushes its logit down.
    above = FixedLogits([5.0, 0.0, 0.0, 0.0])
    total = loss(above, [trigger(0)], x, y, k)
    ce = nn.functional.cross_entropy(above(x), y)
    assert total.item() > 2 * ce.item()
    total.backward()
    assert above.logits.grad[0] > 0


def test_images_of_the_target_class_are_not_pushed_away():
    x, y = torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)  # all of class 0
    model = FixedLogits([5.0, 0.0, 0.0, 0.0])
    ce = nn.functional.cross_entropy(model(x), y)
    assert math.isclose(loss(model, [trigger(0)], x, y, 4).item(), 2 * ce.item(), rel_tol=1e-5)


def test_l1_anchor_measures_distance_to_the_original_weights():
    x, y = torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)
    model = FixedLogits([0.0, 0.0])
    anchor = [torch.tensor([1.0, -2.0])]
    base = loss(model, [], x, y, 2, anchor)
    assert math.isclose(loss(model, [], x, y, 2, anchor, 0.5).item(), base.item() + 1.5, rel_tol=1e-5)


class Exploding(nn.Module):
    """Any update makes it produce NaN; the guard must roll back and never return NaN weights."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 3)

    def forward(self, x):
        out = self.linear(x.flatten(1))
        return out * 1e30 * 1e30 if self.linear.weight.abs().max() > 10 else out


def test_unlearning_never_returns_non_finite_weights():
    torch.manual_seed(0)
    model = Exploding()
    with torch.no_grad():
        model.linear.weight.fill_(9.99)
    x, y = torch.rand(40, 1, 4, 4), torch.randint(0, 3, (40,))
    cfg = UnlearningConfig(max_epochs=2, batch_size=8, lr=1.0, refresh_steps=2)
    result = unlearn(model, [trigger(1)], x[:30], y[:30], x[30:], y[30:], 3, cfg,
                     RecoveryConfig(batch_size=4, hidden=16, noise_dim=12))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.rollbacks > 0
