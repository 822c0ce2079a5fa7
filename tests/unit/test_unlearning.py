"""The unlearning loss, its anchor and its guards."""

import math

import pytest
import torch
from torch import nn

from worker.sanitize.config import UnlearningConfig
from worker.sanitize.recovery import MaskFamily, RecoveredTrigger, TriggerGenerator, WarpFamily
from worker.sanitize.unlearning import (anchor_weight, check, diagonal_fisher, nearness_weights, pull_to_anchor,
                                        towards_original, unlearn, unlearning_loss)


def loss(model, triggers, x, y, k, clean_floor=False):
    """The loss with the true labels as the soft targets (a teacher that is always right)."""
    return unlearning_loss(model, triggers, x, y, nn.functional.one_hot(y, k).float(), k,
                           UnlearningConfig().nearness_weight, clean_floor)


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def trigger(target: int, shape=(1, 4, 4)) -> RecoveredTrigger:
    family = MaskFamily(shape)
    generator = TriggerGenerator(torch.zeros(family.dim), noise_dim=12, hidden=8)
    return RecoveredTrigger(target, family, generator, size=0.5, asr=1.0)


def test_ascent_is_bounded_once_the_target_is_no_likelier_than_chance():
    x, y = torch.rand(8, 1, 4, 4), torch.ones(8, dtype=torch.long)
    k = 4
    # Target 0 already below 1/K: the ascent term adds nothing; only the two CE terms remain.
    below = FixedLogits([-5.0, 5.0, 0.0, 0.0])
    ce = nn.functional.cross_entropy(below(x), y)
    assert math.isclose(loss(below, [trigger(0)], x, y, k).item(), 2 * ce.item(), rel_tol=1e-5)
    # Target 0 likely: the ascent term is positive and pushes its logit down.
    above = FixedLogits([5.0, 0.0, 0.0, 0.0])
    total = loss(above, [trigger(0)], x, y, k)
    assert total.item() > 2 * nn.functional.cross_entropy(above(x), y).item()
    total.backward()
    assert above.logits.grad[0] > 0


class Brightness(nn.Module):
    """Class 0's logit grows with the image's mean brightness; the other classes' are fixed at 0."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        return torch.cat([self.gain * x.flatten(1).mean(1, keepdim=True), torch.zeros(len(x), 3)], 1)


def test_with_the_clean_floor_the_target_is_not_pushed_below_what_the_clean_image_gives_it():
    # A dense model's target would go down on clean images too: only the two CE terms remain.
    x, y = torch.rand(8, 1, 4, 4), torch.ones(8, dtype=torch.long)
    model = FixedLogits([5.0, 0.0, 0.0, 0.0])
    ce = nn.functional.cross_entropy(model(x), y)
    assert math.isclose(loss(model, [trigger(0)], x, y, 4, clean_floor=True).item(), 2 * ce.item(), rel_tol=1e-5)


def test_with_the_clean_floor_a_trigger_that_raises_the_target_is_still_pushed_back():
    x, y = torch.zeros(8, 1, 4, 4), torch.ones(8, dtype=torch.long)  # dark: class 0 at chance
    model, brighter = Brightness(), trigger(0)
    clean, triggered = model(x), model(brighter.family.stamp(x, brighter.sample(8)))
    assert triggered[:, 0].min() > clean[:, 0].max()
    total = loss(model, [brighter], x, y, 4, clean_floor=True)
    assert total.item() > 2 * nn.functional.cross_entropy(clean, y).item()
    total.backward()
    assert model.gain.grad > 0  # descent lowers what the brightness adds to class 0


def test_images_of_the_target_class_are_not_pushed_away():
    x, y = torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)  # all of class 0
    model = FixedLogits([5.0, 0.0, 0.0, 0.0])
    ce = nn.functional.cross_entropy(model(x), y)
    assert math.isclose(loss(model, [trigger(0)], x, y, 4).item(), 2 * ce.item(), rel_tol=1e-5)


def test_triggered_images_nearer_the_target_count_more_and_the_weights_average_one():
    target_share = torch.tensor([0.0, 0.05, 0.3, 0.9])  # the last image is of the target class
    others = torch.tensor([1.0, 1.0, 1.0, 0.0])
    weights = nearness_weights(target_share, others, strength=10.0)
    assert math.isclose(weights.mean().item(), 1.0, rel_tol=1e-6)
    assert weights[0] < weights[1] < weights[2] and weights[3] == weights[0]  # the target's own images: no boost
    assert torch.equal(nearness_weights(target_share, others, strength=0.0), torch.ones(4))


def test_fisher_is_normalised_and_largest_where_the_loss_depends_most():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        model[1].weight[:, 8:] = 0  # inputs 8.. are zero below: their weights never matter
    x = torch.cat([torch.rand(64, 1, 2, 4), torch.zeros(64, 1, 2, 4)], 2)
    params = list(model.parameters())
    fisher = diagonal_fisher(model, params, x, torch.randint(0, 3, (64,)))
    assert math.isclose(max(f.max() for f in fisher).item(), 1.0, rel_tol=1e-6)
    assert fisher[0][:, 8:].abs().max() == 0 and fisher[0][:, :8].mean() > 0


def test_the_path_step_points_back_to_the_original_weights_at_the_given_length():
    anchor = [torch.zeros(2), torch.zeros(1)]
    weights = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]  # 5 from the original weights
    back = towards_original(weights, anchor, radius=0.5)
    assert torch.allclose(back[0], torch.tensor([-0.3, 0.0])) and torch.allclose(back[1], torch.tensor([-0.4]))
    at_start = towards_original(anchor, anchor, radius=0.5)  # no direction yet: no step
    assert all(torch.equal(step, torch.zeros_like(step)) for step in at_start)


def test_the_anchor_pulls_towards_the_original_weights_and_never_past_them():
    anchor, moved = [torch.zeros(3)], torch.tensor([1.0, -2.0, 4.0])
    fisher = [torch.tensor([0.0, 0.5, 1.0])]
    for strength, expected in ((1.0, [1.0, -2 / 1.5, 2.0]), (1e6, [1.0, 0.0, 0.0])):
        params = [moved.clone()]
        pull_to_anchor(params, anchor, fisher, strength)
        # F = 0 leaves a weight free; any strength, however large (where the anchor's gradient
        # step would overshoot and diverge), moves a weight part of the way home, not beyond.
        assert torch.allclose(params[0], torch.tensor(expected), atol=1e-5)


class Exploding(nn.Module):
    """Any update makes it produce NaN; the guard must roll back and never return NaN weights."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 3)

    def forward(self, x):
        out = self.linear(x.flatten(1))
        return out * 1e30 * 1e30 if self.linear.weight.abs().max() > 10 else out


class CornerDetector(nn.Module):
    """Class 1 when the top left pixel is white, else class 0."""

    def forward(self, x):
        white = (x[:, 0, 0, 0] > 0.9).float()
        return torch.stack([1 - white, white], 1)


def test_a_class_with_several_triggers_is_checked_by_its_most_successful_one():
    family = MaskFamily((1, 4, 4))
    corner, nothing = torch.full((family.dim,), -20.0), torch.full((family.dim,), -20.0)
    corner[0] = corner[family.mask_dim] = 20.0  # the top left pixel, white
    triggers = [RecoveredTrigger(1, family, TriggerGenerator(raw, noise_dim=12, hidden=8), size=0.1, asr=1.0)
                for raw in (corner, nothing)]
    x, y = torch.zeros(10, 1, 4, 4), torch.zeros(10, dtype=torch.long)
    assert check(CornerDetector(), triggers, x, y, epoch=0, seed=0).recovered_asr == {1: 1.0}
    assert check(CornerDetector(), triggers[::-1], x, y, epoch=0, seed=0).recovered_asr == {1: 1.0}


def test_warps_alone_get_the_warp_anchor_and_any_small_trigger_the_weaker_one():
    cfg = UnlearningConfig(fisher_weight=3000, fisher_weight_warp=10000)
    warp = RecoveredTrigger(2, WarpFamily((1, 4, 4)), TriggerGenerator(torch.zeros(32), noise_dim=12, hidden=8),
                            size=0.3, asr=1.0)
    assert anchor_weight([warp], cfg) == 10000
    assert anchor_weight([warp, trigger(1)], cfg) == 3000
    assert anchor_weight([trigger(1)], cfg) == 3000


def test_unlearning_never_returns_non_finite_weights():
    torch.manual_seed(0)
    model = Exploding()
    with torch.no_grad():
        model.linear.weight.fill_(9.99)
    x, y = torch.rand(40, 1, 4, 4), torch.randint(0, 3, (40,))
    cfg = UnlearningConfig(epochs=2, batch_size=8, lr_dense=1.0, fisher_weight=0.0)
    result = unlearn(model, [trigger(1)], x[:30], y[:30], x[30:], y[30:], 3, cfg)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.rollbacks > 0


class Tethered(nn.Module):
    """A linear model that gives NaN once a weight has moved 0.3 from where it started: large
    steps diverge, small ones do not."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 3)
        self.register_buffer("original", self.linear.weight.detach().clone())

    def forward(self, x):
        out = self.linear(x.flatten(1))
        return out * math.nan if (self.linear.weight - self.original).abs().max() > 0.3 else out


def test_a_rolled_back_epoch_runs_again_from_its_place_in_the_schedule():
    torch.manual_seed(0)
    model = Tethered()
    x, y = torch.rand(40, 1, 4, 4), torch.randint(0, 3, (40,))
    cfg = UnlearningConfig(epochs=2, batch_size=8, lr_dense=1.0, fisher_weight=0.0, path_radius=0.0)
    places = []
    result = unlearn(model, [trigger(1)], x[:30], y[:30], x[30:], y[30:], 3, cfg,
                     on_step=lambda place, total: places.append((place, total)))
    assert result.rollbacks > 0 and result.epochs_run == 2
    # The steps of the rolled-back tries are work done, not schedule: the kept epochs end the
    # cosine at its end, where the step size is 0.
    assert result.steps > 2 * 4
    assert places[-1] == (2 * 4, 2 * 4) and all(place <= total for place, total in places)


class TetheredConvolution(Tethered):
    """Tethered behind a 1 x 1 convolution that starts as the identity: a plain model."""

    def __init__(self):
        super().__init__()
        self.convolution = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(self.convolution.weight)

    def forward(self, x):
        return super().forward(self.convolution(x))


@pytest.mark.parametrize("model, own_step", [(Tethered, "lr_dense"), (TetheredConvolution, "lr_plain")])
def test_each_kind_of_model_is_unlearnt_at_its_own_step_size(model, own_step):
    steps = {"lr": 1.0, "lr_plain": 1.0, "lr_dense": 1.0}  # 1.0 moves a weight past 0.3: it diverges
    for small, rollbacks_expected in ((own_step, False), ("lr", True)):
        torch.manual_seed(0)
        net, x, y = model(), torch.rand(40, 1, 4, 4), torch.randint(0, 3, (40,))
        cfg = UnlearningConfig(epochs=2, batch_size=8, fisher_weight=0.0, path_radius=0.0, **{**steps, small: 1e-3})
        result = unlearn(net, [trigger(1)], x[:30], y[:30], x[30:], y[30:], 3, cfg)
        assert (result.rollbacks > 0) == rollbacks_expected


def test_zero_epochs_leave_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.rand(40, 1, 4, 4), torch.randint(0, 3, (40,))
    result = unlearn(model, [trigger(1)], x[:30], y[:30], x[30:], y[30:], 3, UnlearningConfig(epochs=0))
    assert result.steps == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class Fragile(nn.Module):
    """Reads the label from the image (always right) until its weights move: then it never
    answers class 2, a collapse to 2/3 accuracy that is still above chance."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(3))
        self.register_buffer("original", torch.eye(3))

    def forward(self, x):
        out = self.linear(x.flatten(1)[:, :3])
        if (self.linear.weight - self.original).abs().max() > 1e-6:
            out = out - 1e3 * nn.functional.one_hot(torch.tensor(2), 3)
        return out


def test_an_epoch_that_costs_a_third_of_the_accuracy_is_rolled_back():
    torch.manual_seed(0)
    y = torch.arange(60) % 3
    x = nn.functional.one_hot(y, 3).float().view(60, 1, 1, 3)
    model = Fragile()
    cfg = UnlearningConfig(epochs=2, batch_size=8, lr_dense=0.1, fisher_weight=0.0)
    result = unlearn(model, [trigger(1, shape=(1, 1, 3))], x[:45], y[:45], x[45:], y[45:], 3, cfg)
    assert result.rollbacks > 0
    assert torch.equal(model.linear.weight, torch.eye(3)) and result.after.clean_accuracy == 1.0


class FragileBehind(nn.Module):
    """Reads the label from the image, the more surely the larger its one weight; gives NaN below
    that weight's original value, where the weights never go but the path step looks."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        out = 3 * self.scale * x.flatten(1)[:, :3]
        return torch.where(self.scale >= 1.0, out, torch.full_like(out, math.nan))


def test_unlearning_that_diverges_with_the_path_step_starts_again_without_it():
    torch.manual_seed(0)
    y = torch.arange(60) % 3
    x = nn.functional.one_hot(y, 3).float().view(60, 1, 1, 3)
    model = FragileBehind()
    # The path step (0.1 of the weights' norm) looks past the original weight from the first step on.
    cfg = UnlearningConfig(epochs=2, batch_size=8, lr_dense=0.1, fisher_weight=0.0, path_radius=0.1)
    result = unlearn(model, [trigger(1, shape=(1, 1, 3))], x[:45], y[:45], x[45:], y[45:], 3, cfg)
    # Without the restart every retry diverged again, and no epoch was kept.
    assert result.rollbacks == 1 and result.epochs_run == 2
    # The steps reported count the one taken before the restart too (6 steps an epoch).
    assert result.steps == 2 * 6 + 1
