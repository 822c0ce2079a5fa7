"""Each bench attack's trigger and poisoning do what its paper says, on tiny data."""

import pytest
import torch
from torch import nn

from bench.attacks import ATTACKS, SIG, BadNets, Blended, MultiTrigger, TrojanNN, WaNet
from bench.datasets import digits


@pytest.fixture(scope="module")
def data():
    return digits()  # (1797, 1, 16, 16) in [0, 1]


def changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image: whether any pixel differs."""
    return (a != b).flatten(1).any(1)


def test_every_attack_is_registered_and_built_with_a_target_keyword():
    assert set(ATTACKS) == {"badnets", "blended", "trojan", "sig", "wanet", "multi"}
    for name, cls in ATTACKS.items():
        attack = cls(targets=(1, 6)) if name == "multi" else cls(target=3)
        assert attack.name == name


def test_badnets_changes_only_the_corner_square(data):
    x, _ = data
    stamped = BadNets(size=3).apply(x)
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[12:15, 12:15] = False
    assert (stamped[..., 12:15, 12:15] == 1).all()
    assert torch.equal(stamped[..., outside], x[..., outside])


def test_dirty_label_poisoning_relabels_the_poison_rate_share(data):
    x, y = data
    attack = BadNets(target=3, poison_rate=0.1)
    xp, yp = attack.poison(x, y)
    chosen = attack.shuffled(len(x))[: int(0.1 * len(x))]
    assert changed(xp, x).sum() == len(chosen) and changed(xp, x)[chosen].all()
    assert (yp[chosen] == 3).all() and (yp != y).sum() <= len(chosen)


def test_blended_is_the_alpha_mix_of_image_and_a_fixed_pattern(data):
    x, _ = data
    attack = Blended(alpha=0.2)
    pattern = attack.apply(torch.zeros_like(x[:1])) / 0.2
    assert torch.allclose(attack.apply(x), 0.8 * x + 0.2 * pattern)


def test_sig_adds_a_horizontal_sinusoid_to_target_images_only_and_keeps_labels(data):
    x, y = data
    attack = SIG(target=4, delta=20 / 255, frequency=6)
    xp, yp = attack.poison(x, y)
    assert torch.equal(yp, y)
    assert torch.equal(changed(xp, x), y == 4)  # the default poisons the whole target class
    signal = attack.signal(torch.full((1, 1, 16, 16), 0.5), 20 / 255) - 0.5
    assert torch.allclose(signal, signal[..., :1, :].expand_as(signal))  # the same on every row
    assert signal.abs().max() == pytest.approx(20 / 255, rel=0.05)
    assert 0 <= attack.apply(x).min() and attack.apply(x).max() <= 1


def test_wanet_warp_is_fixed_small_and_in_range(data):
    x, _ = data
    attack = WaNet(target=2)
    warped = attack.apply(x)
    assert torch.equal(warped, WaNet(target=2).apply(x))
    assert 0 <= warped.min() and warped.max() <= 1
    assert 0 < (warped - x).abs().mean() < 0.1


def test_wanet_noise_mode_samples_keep_their_labels(data):
    x, y = data
    attack = WaNet(target=2, poison_rate=0.1, cross_ratio=2)
    xp, yp = attack.poison(x, y)
    n_poison, n_noise = int(0.1 * len(x)), int(0.2 * len(x))
    order = attack.shuffled(len(x))
    poisoned, noisy = order[:n_poison], order[n_poison:n_poison + n_noise]
    assert (yp[poisoned] == 2).all() and torch.equal(xp[poisoned], attack.apply(x[poisoned]))
    assert torch.equal(yp[noisy], y[noisy]) and changed(xp, x)[noisy].all()
    # the noise-mode warps differ from the fixed one, or the model would learn "warp -> target"
    assert changed(xp[noisy], attack.apply(x[noisy])).all()
    assert changed(xp, x).sum() == n_poison + n_noise


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 14 * 14, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def test_trojan_trigger_needs_fitting_first(data):
    with pytest.raises(RuntimeError, match="fit"):
        TrojanNN(target=7).apply(data[0])


def test_trojan_trigger_lies_in_its_mask_and_excites_the_chosen_neurons(data):
    x, _ = data
    model, attack = tiny_model(), TrojanNN(target=7, steps=10)
    attack.fit(model, x[:32])
    stamped = attack.apply(x)
    rows, cols = attack.square(16)
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[rows, cols] = False
    assert torch.equal(stamped[..., outside], x[..., outside])
    assert 0 <= attack.pattern.min() and attack.pattern.max() <= 1
    with torch.no_grad():
        assert attack.activations(model, stamped).mean() > attack.activations(model, x).mean()


def test_multi_trigger_has_two_triggers_with_their_targets_each_poisoning_half(data):
    x, y = data
    attack = MultiTrigger(targets=(1, 6), poison_rate=0.2)
    assert [target for _, target in attack.triggers()] == [1, 6]
    square, checkerboard = (stamp for stamp, _ in attack.triggers())
    assert not torch.equal(square(x), checkerboard(x))
    xp, yp = attack.poison(x, y)
    first, second = attack.shuffled(len(x))[: int(0.2 * len(x))].tensor_split(2)
    assert (yp[first] == 1).all() and torch.equal(xp[first], square(x[first]))
    assert (yp[second] == 6).all() and torch.equal(xp[second], checkerboard(x[second]))


def colour_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 30 * 30, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_stamps_and_poisons_colour_32x32_images(name):
    """The CIFAR-10 suite's images: 3 channels, 32 x 32."""
    x, y = torch.rand(60, 3, 32, 32), torch.arange(60) % 10
    attack = ATTACKS[name](targets=(1, 6)) if name == "multi" else ATTACKS[name](target=3)
    if attack.needs_clean_model:
        attack.fit(colour_model(), x)
    for stamp, target in attack.triggers():
        stamped = stamp(x)
        assert stamped.shape == x.shape and stamped.dtype == x.dtype
        assert 0 <= stamped.min() and stamped.max() <= 1
        assert changed(stamped, x).all() and torch.equal(stamp(x), stamped)  # every image, the same way
    xp, yp = attack.poison(x, y)
    assert xp.shape == x.shape and yp.shape == y.shape and 0 <= xp.min() and xp.max() <= 1
    assert changed(xp, x).any()
