"""The generator, MINE and trigger-family pieces of trigger recovery."""

import math

import torch

from worker.sanitize.config import RecoveryConfig
from worker.sanitize.recovery import (
    BatchedLinear, BlendFamily, FoundTrigger, MaskFamily, MutualInformation, PatchFamily, StatisticsNetwork,
    TriggerGenerator, WarpFamily, budget, held_out_asr, search_triggers,
)


def test_batched_linear_keeps_rows_independent():
    torch.manual_seed(0)
    layer = BatchedLinear(3, 4, 5)
    x = torch.rand(3, 2, 4)
    out = layer(x)
    for k in range(3):
        assert torch.allclose(out[k], x[k] @ layer.weight[k] + layer.bias[k], atol=1e-6)
    out[1].sum().backward()
    assert layer.weight.grad[0].abs().sum() == 0 and layer.weight.grad[1].abs().sum() > 0


def test_generator_starts_at_its_base_and_uses_the_noise():
    torch.manual_seed(0)
    base = torch.randn(10)
    g = TriggerGenerator(base, noise_dim=12, hidden=16)
    t = g(g.noise(8))
    assert t.shape == (1, 8, 10)
    assert not torch.allclose(t[0, 0], t[0, 1])  # different noise, different triggers
    assert (t[0] - base).abs().mean() < 0.5  # near the search's trigger


def test_fixed_generator_outputs_are_the_same_for_every_noise():
    torch.manual_seed(0)
    g = TriggerGenerator(torch.zeros(10), noise_dim=12, hidden=16, fixed=1)
    t = g(g.noise(8))
    assert torch.allclose(t[0, :, 0], torch.zeros(8))
    assert not torch.allclose(t[0, 0, 1:], t[0, 1, 1:])


def test_mine_separates_dependent_from_independent_pairs():
    torch.manual_seed(0)
    estimates = []
    for dependent in (True, False):
        mine = MutualInformation(StatisticsNetwork(noise_dim=2, trigger_dim=2, hidden=32), rate=0.1)
        opt = torch.optim.Adam(mine.statistics.parameters(), lr=1e-2)

        def pair(n):
            z = torch.rand(1, n, 2)
            return z, (z if dependent else torch.rand(1, n, 2))

        for _ in range(300):
            opt.zero_grad()
            mine.statistics_loss(*pair(256)).backward()
            opt.step()
        estimates.append(mine.estimate(*pair(2048)).item())
    assert estimates[0] > 0.5 and abs(estimates[1]) < 0.1


def test_mine_gradient_rewards_diverse_generators():
    torch.manual_seed(0)
    mine = MutualInformation(StatisticsNetwork(noise_dim=4, trigger_dim=4))
    z = torch.rand(1, 64, 4)
    t = (z * 0.01 + 0.5).requires_grad_(True)  # nearly collapsed
    mine.estimate(z, t).sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()


def logit(p):
    return torch.logit(torch.tensor(p))


def test_mask_family_blends_mask_and_pattern():
    family = MaskFamily((1, 2, 2))
    x = torch.zeros(1, 1, 2, 2)
    raw = logit([[0.999999, 1e-6, 1e-6, 0.5, 0.8, 0.8, 0.8, 0.8]])  # mask, then pattern
    out = family.stamp(x, raw)
    assert torch.allclose(out.flatten(), torch.tensor([0.8, 0.0, 0.0, 0.4]), atol=1e-4)
    assert math.isclose(family.size(raw).item(), 0.375, rel_tol=1e-4)
    moved = family.stamp(x, family.shifted(raw, 1, 0))
    assert torch.allclose(moved.flatten(), torch.tensor([0.0, 0.4, 0.8, 0.0]), atol=1e-4)


def test_blend_family_is_an_alpha_blend_sized_by_its_factor():
    family = BlendFamily((1, 2, 2))
    assert family.dim == 5
    x = torch.rand(3, 1, 2, 2)
    pattern = torch.tensor([0.1, 0.9, 0.5, 0.2])
    raw = logit(torch.cat([torch.tensor([0.25]), pattern]).tolist()).expand(3, -1)
    assert torch.allclose(family.stamp(x, raw), 0.75 * x + 0.25 * pattern.view(1, 1, 2, 2), atol=1e-5)
    assert torch.allclose(family.size(raw), torch.full((3,), 0.25))


def test_warp_family_is_the_identity_at_zero_and_sized_in_pixels():
    family = WarpFamily((1, 8, 8), grid=4)
    x = torch.rand(2, 1, 8, 8)
    still = torch.zeros(2, family.dim)
    assert torch.allclose(family.stamp(x, still), x, atol=1e-5)
    assert torch.allclose(family.size(still), torch.zeros(2))
    one_right = torch.cat([torch.ones(2, 16), torch.zeros(2, 16)], 1)  # every x-offset is 1 pixel
    assert torch.allclose(family.size(one_right), torch.ones(2), atol=1e-5)
    # Sampling one pixel to the right moves the image one pixel left (border pixels repeat).
    assert torch.allclose(family.stamp(x, one_right)[..., :-1], x[..., 1:], atol=1e-5)


def test_patch_family_pastes_whole_patch_inside_the_image():
    torch.manual_seed(0)
    family = PatchFamily((3, 8, 8), patch_size=3)
    x = torch.zeros(50, 3, 8, 8)
    raw = torch.full((50, 27), 20.0)  # sigmoid -> 1
    out = family.stamp(x, raw)
    assert torch.allclose(out.sum((1, 2, 3)), torch.full((50,), 27.0), atol=1e-3)  # never clipped
    positions = {tuple(out[i, 0].nonzero()[0].tolist()) for i in range(50)}
    assert len(positions) > 5  # random positions
    assert math.isclose(family.size(raw)[0].item(), 9 / 64)


class PlantedBackdoor(torch.nn.Module):
    """A 'model' that predicts class 2 whenever the top-left pixel is bright."""

    def forward(self, x):
        logits = torch.zeros(len(x), 4)
        logits[:, 0] = 1.0
        logits[:, 1] = x.mean((1, 2, 3)) * 4 - 0.2
        logits[:, 2] = 20 * (x[:, 0, 0, 0] - 0.5)
        logits[:, 3] = x[:, 0, 3:, 3:].mean((1, 2)) * 4 - 0.2
        return logits


def test_search_finds_a_small_trigger_for_the_planted_target_only():
    torch.manual_seed(0)
    x = torch.rand(200, 1, 6, 6) * 0.3
    y = torch.randint(0, 4, (200,))
    cfg = RecoveryConfig(screen_steps=30, refine_steps=120, finalists=2, batch_size=16)
    found = search_triggers(PlantedBackdoor(), MaskFamily((1, 6, 6)), x[:150], y[:150], 4, cfg, seed=0)
    assert found[2].size < 0.06  # one pixel of 36 is enough
    # The smallest trigger that held a search batch sits at the edge of working; detection
    # re-measures it on held-out images (budget) before anything is decided.
    assert held_out_asr(PlantedBackdoor(), found[2], x[150:], y[150:]) > 0.5
    # (Class 0 wins every image already: its trigger is empty. A real model gets its own
    # images right, so no class is that cheap.)
    assert min(found[c].size for c in (1, 3)) > 3 * found[2].size


def test_budget_is_the_least_of_a_trigger_in_its_own_shape_that_still_works():
    x, y = torch.rand(100, 1, 6, 6) * 0.3, torch.zeros(100, dtype=torch.long)
    mask = torch.full((36,), -9.0)
    mask[0], mask[7] = 9.0, 8.0  # the planted pixel first, then one that does nothing
    pattern = torch.full((36,), 9.0)  # white
    trigger = FoundTrigger(2, MaskFamily((1, 6, 6)), torch.cat([mask, pattern]), 0.5, 0.5, True)
    assert budget(PlantedBackdoor(), trigger, x, y, success=0.5) == 1 / 36
    # In the blend family the same white image needs a blend factor that lifts pixel (0, 0) over 0.5.
    blend = FoundTrigger(2, BlendFamily((1, 6, 6)), torch.cat([torch.zeros(1), pattern]), 0.5, 0.5, True)
    assert 0.2 < budget(PlantedBackdoor(), blend, x, y, success=0.5) < 0.6
    # A model that never answers to it: the family's whole.
    assert budget(lambda images: torch.zeros(len(images), 4).index_fill_(1, torch.tensor([0]), 1.0),
                  trigger, x, y, success=0.5) == 1.0


class BandedBackdoor(torch.nn.Module):
    """Predicts class 2 when the top-left pixel is bright but not white: a trigger that works
    faint and fails at full strength, as a blend pattern fails where it is the whole image."""

    def forward(self, x):
        logits = torch.zeros(len(x), 4)
        bright = x[:, 0, 0, 0]
        logits[:, 2] = torch.where(bright < 0.8, 20 * (bright - 0.5), torch.full_like(bright, -10.0))
        return logits


def test_budget_sizes_a_trigger_that_fails_at_the_whole_size_below_its_size_as_found():
    x, y = torch.rand(100, 1, 6, 6) * 0.3, torch.zeros(100, dtype=torch.long)
    white = torch.cat([torch.zeros(1), torch.full((36,), 9.0)])
    as_found = FoundTrigger(2, BlendFamily((1, 6, 6)), white, 0.48, 0.48, True)
    # The pattern alone (factor 1) is white and fails; at half it works, and the bisection below
    # that finds the factor that lifts pixel (0, 0) over 0.5 for half the images.
    assert 0.3 < budget(BandedBackdoor(), as_found, x, y, success=0.5) < 0.48
    # Found at 0.9, where it fails as at every larger size: no size it is known to work at.
    too_large = FoundTrigger(2, BlendFamily((1, 6, 6)), white, 0.9, 0.9, True)
    assert budget(BandedBackdoor(), too_large, x, y, success=0.5) == 1.0


def test_budget_stops_counting_early_without_changing_its_answer():
    # The blend factor lifts pixel (0, 0) over 0.5 sooner for darker images: each bisection step
    # sits at a different share of images, some near the line.
    torch.manual_seed(0)
    x, y = torch.rand(300, 1, 6, 6) * 0.3, torch.zeros(300, dtype=torch.long)
    x[:, 0, 0, 0] = torch.linspace(0.0, 0.45, 300)
    blend = FoundTrigger(2, BlendFamily((1, 6, 6)), torch.cat([torch.zeros(1), torch.full((36,), 9.0)]), 0.5, 0.5, True)
    for success in (0.1, 0.5, 0.9):
        counted_whole = budget(PlantedBackdoor(), blend, x, y, success, chunk=10_000)
        assert budget(PlantedBackdoor(), blend, x, y, success, chunk=7) == counted_whole


def test_budget_counts_images_of_every_class_when_the_samples_come_sorted_by_class():
    # 100 images of each of classes 0, 1 and 3, in that order, each marked by its class in the
    # last pixel: the model records which classes it is shown.
    x = torch.rand(300, 1, 6, 6) * 0.3
    y = torch.arange(3).repeat_interleave(100)
    y[y == 2] = 3
    x[:, 0, 5, 5] = y / 10
    seen = set()

    def recording(images):
        marks = images[:, 0, 5, 5]
        seen.update((marks[marks < 0.5] * 10).round().long().tolist())  # not stamped over
        return PlantedBackdoor()(images)

    mask = torch.full((36,), -9.0)
    mask[0] = 9.0
    trigger = FoundTrigger(2, MaskFamily((1, 6, 6)), torch.cat([mask, torch.full((36,), 9.0)]), 0.5, 0.5, True)
    assert budget(recording, trigger, x, y, success=0.5, max_images=64) == 1 / 36
    assert seen == {0, 1, 3}


class PlantedWarp(torch.nn.Module):
    """Predicts class 1 when the image is shifted right: a smooth warp, the WaNet kind."""

    def forward(self, x):
        logits = torch.zeros(len(x), 3)
        logits[:, 0] = 0.5
        # A left-right gradient image: sampling to the right brightens the left columns.
        logits[:, 1] = 40 * (x[..., :2].mean((1, 2, 3)) - x[..., -2:].mean((1, 2, 3)) + 0.1)
        return logits


def test_warp_search_finds_a_displacement_that_works():
    torch.manual_seed(0)
    ramp = torch.linspace(0, 1, 8).view(1, 1, 1, 8).expand(60, 1, 8, 8)
    y = torch.randint(0, 3, (60,))
    cfg = RecoveryConfig(screen_steps=40, refine_steps=40, finalists=1, batch_size=16, lr=0.2)
    found = search_triggers(PlantedWarp(), WarpFamily((1, 8, 8)), ramp.clone(), y, 3, cfg, seed=0)
    assert found[1].worked and found[1].size < 3.0
    assert held_out_asr(PlantedWarp(), found[1], ramp, y) > 0.9
