"""The FT, FP and NC baselines of the bench: each one's core step, on tiny hand-made models."""

import pytest
import torch
from torch import nn

from bench.baselines import fine_pruning, finetune, neural_cleanse
from bench.baselines.common import fine_tune
from bench.baselines.fine_pruning import channel_activations, last_conv, prune_channels
from bench.baselines.neural_cleanse import (CostSchedule, Settings, flag, largest_anomaly_index, reverse_engineer,
                                           unlearning_set)
from worker.sanitize.architectures import build_model


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("defense", [finetune, fine_pruning, neural_cleanse])
@pytest.mark.parametrize("arch", ["small_cnn", "small_resnet"])
def test_quick_defense_returns_a_new_plain_model_and_leaves_the_input_alone(defense, arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=4, in_channels=1).eval()
    x, y = torch.rand(64, 1, 16, 16), torch.randint(0, 4, (64,))
    before = snapshot(model)
    defended, _ = defense.defend(model, x, y, 4, quick=True)
    assert defended is not model and not defended.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # A plain module: its weights load into the architecture as it is (no pruning masks left).
    build_model(arch, num_classes=4, in_channels=1).load_state_dict(defended.state_dict())
    assert defended(x).shape == (64, 4)


def test_fine_tuning_changes_the_copy():
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=4, in_channels=1).eval()
    x, y = torch.rand(64, 1, 16, 16), torch.randint(0, 4, (64,))
    defended, _ = finetune.defend(model, x, y, 4, quick=True)
    assert not torch.equal(defended.conv1.weight, model.conv1.weight)


# --- FP ---------------------------------------------------------------------------------------

class ScaledChannels(nn.Module):
    """One 1x1 convolution whose channel i outputs scales[i] times the input, then a linear head."""

    def __init__(self, scales):
        super().__init__()
        self.conv = nn.Conv2d(1, len(scales), 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(scales).view(-1, 1, 1, 1))
            self.conv.bias.zero_()
        self.head = nn.Linear(len(scales), 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_last_conv_is_the_last_feature_layer_not_a_shortcut():
    cnn = build_model("small_cnn", num_classes=10, in_channels=1)
    assert last_conv(cnn) is cnn.conv2
    resnet = build_model("small_resnet", num_classes=10, in_channels=1)
    assert last_conv(resnet) is resnet.layers[-1].conv2


def test_least_active_channels_come_first_and_pruned_channels_output_zero():
    model = ScaledChannels([3.0, 1.0, 4.0, 2.0])
    x = torch.rand(32, 1, 5, 5)
    ranking = channel_activations(model, model.conv, x).argsort()
    assert ranking.tolist() == [1, 3, 0, 2]

    prune_channels(model, ranking[:2])
    out = model.conv(x)
    assert (out[:, [1, 3]] == 0).all()
    assert torch.allclose(out[:, [0, 2]], x * torch.tensor([3.0, 4.0]).view(1, 2, 1, 1))
    # The pruning mask holds through fine-tuning: the channels stay dead.
    fine_tune(model, x, torch.randint(0, 3, (32,)), epochs=2, lr=0.1)
    assert (model.conv(x)[:, [1, 3]] == 0).all()


# --- NC ---------------------------------------------------------------------------------------

def test_mad_flags_an_obvious_small_outlier_only():
    others = [20.0, 21.0, 19.0, 20.5, 21.5, 19.0, 20.0, 21.0, 19.5]
    assert flag(torch.tensor([2.0] + others)) == [0]
    # Larger than everyone is not a backdoor; an even spread has no outlier.
    assert flag(torch.tensor([60.0] + others)) == []
    assert flag(torch.linspace(10.0, 20.0, 10)) == []
    assert flag(torch.full((10,), 5.0)) == []
    # The model's score counts small classes only: the large outlier scores like an even spread.
    assert largest_anomaly_index(torch.tensor([2.0] + others)) > 10
    assert largest_anomaly_index(torch.tensor([60.0] + others)) < 2


def test_cost_rises_after_patience_successes_and_falls_after_patience_failures():
    settings = Settings()
    schedule = CostSchedule(2, settings)
    mask, pattern = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    works = torch.tensor([1.0, 0.0])  # class 0's trigger works, class 1's never does
    for _ in range(settings.patience):
        schedule.update(works, torch.tensor([3.0, 2.0]), mask, pattern)
    assert schedule.cost.tolist() == pytest.approx([settings.init_cost * settings.cost_up,
                                                    settings.init_cost / settings.cost_down])
    # Only a working trigger becomes a class's best.
    assert schedule.best_norm[0] == 3.0 and schedule.best_norm[1] == float("inf")


class PatchBackdoor(nn.Module):
    """Class 0 wins only when the 2x2 bottom-right corner is white: a 4-pixel trigger. Every
    other class reads a random +-1 pattern over the whole image, so reaching it from any image
    takes a large mask."""

    def __init__(self, num_classes: int = 5, side: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("patterns", torch.randint(0, 2, (num_classes - 1, side * side), generator=g) * 2.0 - 1)

    def forward(self, x):
        corner = x[:, 0, -2:, -2:].sum((1, 2))
        others = 10 * x.flatten(1) @ self.patterns.T / x[0].numel()
        return torch.cat([20 * (corner - 3.5)[:, None], others], 1)


@pytest.mark.parametrize("script", [False, True], ids=["module", "torchscript"])
def test_mask_search_finds_a_small_mask_for_the_patched_class(script):
    model = torch.jit.script(PatchBackdoor()) if script else PatchBackdoor()
    x = torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    masks, patterns = reverse_engineer(model, x, 5, Settings(epochs=15, batch_size=16), seed=0)
    norms = masks.flatten(1).sum(1)
    assert norms.argmin() == 0 and norms[0] < 6  # about the 4 trigger pixels
    assert masks[0, 0, -2:, -2:].min() > 0.5 and patterns[0, 0, -2:, -2:].min() > 0.5
    assert flag(norms) == [0]


def test_unlearning_set_stamps_a_fifth_of_the_images_and_keeps_their_true_labels():
    x, y = torch.zeros(10, 1, 4, 4), torch.arange(10)
    masks, patterns = torch.zeros(3, 1, 4, 4), torch.ones(3, 1, 4, 4)
    masks[2, :, 0, 0] = 1  # class 2's trigger: one white pixel
    xu, yu = unlearning_set(x, y, masks, patterns, flagged=[2], ratio=0.2)
    assert len(xu) == 10 and sorted(yu.tolist()) == list(range(10))
    assert int(xu[:, 0, 0, 0].sum()) == 2 and xu[:, :, 1:].sum() == 0
    # Several flagged classes: each gets its own stamped copies of the same fifth.
    xu, yu = unlearning_set(x, y, masks, patterns, flagged=[2, 1], ratio=0.2)
    assert len(xu) == 12
