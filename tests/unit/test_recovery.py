"""The generator, MINE and trigger-family pieces of trigger recovery."""

import math

import torch

from worker.sanitize.config import RecoveryConfig
from worker.sanitize.recovery import (
    BatchedLinear, BlendFamily, MaskFamily, MutualInformation, PatchFamily, StatisticsNetwork,
    TriggerGenerator, recover_triggers,
)


def test_batched_linear_keeps_classes_independent():
    torch.manual_seed(0)
    layer = BatchedLinear(3, 4, 5)
    x = torch.rand(3, 2, 4)
    out = layer(x)
    for k in range(3):
        assert torch.allclose(out[k], x[k] @ layer.weight[k] + layer.bias[k], atol=1e-6)
    assert torch.allclose(layer(x[[2, 0]], rows=[2, 0]), out[[2, 0]])
    out[1].sum().backward()
    assert layer.weight.grad[0].abs().sum() == 0 and layer.weight.grad[1].abs().sum() > 0


def test_generator_outputs_triggers_in_unit_range_and_uses_the_noise():
    torch.manual_seed(0)
    g = TriggerGenerator(k=4, noise_dim=12, hidden=16, out_dim=10)
    z = g.noise(4, 8)
    t = g(z)
    assert t.shape == (4, 8, 10) and t.min() >= 0 and t.max() <= 1
    assert not torch.allclose(t[:, 0], t[:, 1])  # different noise, different triggers
    single = g.select([2])
    assert torch.allclose(single(z[2:3]), t[2:3])


def test_fixed_generator_outputs_are_the_same_for_every_noise():
    torch.manual_seed(0)
    g = TriggerGenerator(k=2, noise_dim=12, hidden=16, out_dim=10, fixed=1)
    t = g(g.noise(2, 8))
    assert torch.allclose(t[:, :, 0], t[:, :1, 0].expand(2, 8))
    assert not torch.allclose(t[:, 0, 1:], t[:, 1, 1:])
    assert torch.allclose(g.select([1])(g.noise(1, 3))[0, :, 0], t[1, :3, 0])


def test_mine_separates_dependent_from_independent_pairs():
    torch.manual_seed(0)
    mine = MutualInformation(StatisticsNetwork(k=2, noise_dim=2, trigger_dim=2, hidden=32), rate=0.1)
    opt = torch.optim.Adam(mine.statistics.parameters(), lr=1e-2)
    for _ in range(300):
        z = torch.rand(2, 256, 2)
        t = torch.stack([z[0], torch.rand(256, 2)])  # class 0: t = z; class 1: independent
        opt.zero_grad()
        mine.statistics_loss(z, t).backward()
        opt.step()
    z = torch.rand(2, 2048, 2)
    estimate = mine.estimate(z, torch.stack([z[0], torch.rand(2048, 2)]))
    assert estimate[0] > 0.5 and abs(estimate[1]) < 0.1


def test_mine_gradient_rewards_diverse_generators():
    torch.manual_seed(0)
    mine = MutualInformation(StatisticsNetwork(k=1, noise_dim=4, trigger_dim=4))
    z = torch.rand(1, 64, 4)
    t = (z * 0.01 + 0.5).requires_grad_(True)  # nearly collapsed
    mine.estimate(z, t).sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()


def test_mask_family_blends_and_caps():
    family = MaskFamily((1, 2, 2))
    x = torch.zeros(1, 1, 2, 2)
    t = torch.tensor([[1.0, 0.0, 0.0, 0.5, 0.8, 0.8, 0.8, 0.8]])  # mask then pattern
    out = family.stamp(x, t)
    assert torch.allclose(out.flatten(), torch.tensor([0.8, 0.0, 0.0, 0.4]))
    assert math.isclose(family.size(t).item(), 0.375)
    capped = family.capped(0.1)
    assert math.isclose(capped.split(t)["mask"].mean().item(), 0.1, rel_tol=1e-5)


def test_blend_family_is_an_alpha_blend_sized_by_its_factor():
    family = BlendFamily((1, 2, 2))
    assert family.dim == 5
    x = torch.rand(3, 1, 2, 2)
    pattern = torch.tensor([0.0, 1.0, 0.5, 0.2])
    t = torch.cat([torch.tensor([0.25]), pattern]).expand(3, -1)  # blend factor, then pattern
    assert torch.allclose(family.stamp(x, t), 0.75 * x + 0.25 * pattern.view(1, 1, 2, 2))
    assert torch.allclose(family.size(t), torch.full((3,), 0.25))
    assert torch.allclose(family.capped(0.1).split(t)["mask"], torch.full((3, 1, 1, 1), 0.1))


def test_patch_family_pastes_whole_patch_inside_the_image():
    torch.manual_seed(0)
    family = PatchFamily((3, 8, 8), patch_size=3)
    x = torch.zeros(50, 3, 8, 8)
    t = torch.ones(50, 27)
    out = family.stamp(x, t)
    assert (out.sum((1, 2, 3)) == 27).all()  # the whole 3x3x3 patch, never clipped
    positions = {tuple(out[i, 0].nonzero()[0].tolist()) for i in range(50)}
    assert len(positions) > 5  # random positions
    assert math.isclose(family.size(t)[0].item(), 9 / 64)


class PlantedBackdoor(torch.nn.Module):
    """A linear 'model' that predicts class 2 whenever the top-left pixel is bright."""

    def forward(self, x):
        logits = torch.zeros(len(x), 4)
        logits[:, 0] = 1.0
        logits[:, 2] = 20 * (x[:, 0, 0, 0] - 0.5)
        return logits


def test_recovery_finds_a_small_trigger_only_for_the_planted_target():
    torch.manual_seed(0)
    x = torch.rand(200, 1, 6, 6) * 0.3
    y = torch.randint(0, 4, (200,))
    cfg = RecoveryConfig(steps=120, batch_size=16, hidden=32)
    results = recover_triggers(PlantedBackdoor(), MaskFamily((1, 6, 6)), x[:150], y[:150],
                               x[150:], y[150:], 4, cfg)
    assert results[2].asr > 0.9
    assert results[2].size < 0.2
    assert results[1].asr < 0.5  # class 1 is never predicted: nothing to find


class PlantedBlend(torch.nn.Module):
    """Predicts class 2 when the image correlates with a fixed random pattern, as a model
    poisoned with that pattern blended over its images would."""

    def __init__(self):
        super().__init__()
        self.sign = torch.randint(0, 2, (1, 1, 6, 6)).float() * 2 - 1

    def forward(self, x):
        centred = x - x.mean((1, 2, 3), keepdim=True)
        logits = torch.zeros(len(x), 4)
        logits[:, 0] = 1.0
        logits[:, 2] = 200 * ((centred * self.sign).mean((1, 2, 3)) - 0.02)
        return logits


def test_recovery_finds_a_small_blend_factor_only_for_the_planted_target():
    torch.manual_seed(0)
    x = torch.rand(200, 1, 6, 6) * 0.3
    y = torch.randint(0, 4, (200,))
    cfg = RecoveryConfig(steps=120, batch_size=16, hidden=32)
    results = recover_triggers(PlantedBlend(), BlendFamily((1, 6, 6)), x[:150], y[:150],
                               x[150:], y[150:], 4, cfg)
    assert results[2].asr > 0.9
    assert results[2].size < 0.2  # a > 0.05 flips it on average: 0.5 a > 0.02 + 1/200
    assert results[1].asr < 0.5
