"""The core steps of the i-BAU, ANP and BAERASE-paper baselines, on tiny models and 16x16 digits."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from bench.baselines import anp, baerase_paper, ibau
from bench.datasets import digits
from bench.train import train_classifier
from worker.sanitize.architectures import build_model
from worker.sanitize.recovery import PatchFamily


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Models this small run fastest on one thread, and far slower on a busy machine with more.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    x, y = digits()
    return x[:600], y[:600]


@pytest.fixture(scope="module")
def trained(data):
    x, y = data
    return train_classifier("small_cnn", x, y, num_classes=10, epochs=2)


def same_weights(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# i-BAU

def test_universal_perturbation_stays_in_its_ball_and_raises_the_loss(trained, data):
    x, _ = data
    s = dataclasses.replace(ibau.FULL, radius=2.0)
    delta = ibau.universal_perturbation(trained, list(x.split(64)), s)
    assert delta.shape == (1, *x.shape[1:])
    assert delta.norm() <= 2.0 + 1e-4
    with torch.no_grad():
        predicted = trained(x).argmax(1)
        assert F.cross_entropy(trained(x + delta), predicted) > F.cross_entropy(trained(x), predicted)


def test_hypergradient_adds_the_implicit_term_to_the_direct_gradient(trained, data):
    x, y = data
    delta = torch.rand(1, *x.shape[1:]) * 0.5
    batch = (x[:64], y[:64])
    direct = ibau.hypergradient(trained, delta, batch, batch, dataclasses.replace(ibau.FULL, fixed_point_iters=0),
                                torch.Generator().manual_seed(0))
    full = ibau.hypergradient(trained, delta, batch, batch, ibau.FULL, torch.Generator().manual_seed(0))
    params = list(trained.parameters())
    assert [g.shape for g in full] == [p.shape for p in params]
    assert all(torch.isfinite(g).all() for g in full)
    assert any(not torch.allclose(d, f) for d, f in zip(direct, full))


def test_ibau_leaves_the_input_model_unchanged_and_returns_a_finite_model(trained, data):
    x, y = data
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    defended, _ = ibau.defend(trained, x, y, 10, quick=True)
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    assert defended is not trained and not defended.training
    assert all(torch.isfinite(p).all() for p in defended.parameters())
    assert not same_weights(defended, trained)


# ANP

def test_neuron_perturbation_runs_a_layer_with_scaled_weight_and_bias():
    torch.manual_seed(0)
    for layer, x in ((torch.nn.Conv2d(2, 3, 3), torch.randn(4, 2, 6, 6)),
                     (torch.nn.BatchNorm2d(3).eval(), torch.randn(4, 3, 6, 6))):
        with torch.no_grad():
            layer.bias.normal_()
            plain = layer(x)
        neurons = anp.NeuronPerturbation(layer)
        m, d_w, d_b = torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.1, -0.2, 0.3]), torch.tensor([-0.4, 0.0, 0.4])
        with torch.no_grad():
            neurons.mask.copy_(m)
            neurons.noise.copy_(d_w)
            neurons.noise_bias.copy_(d_b)
            # Clean: the mask scales the weight part only; mask 1 keeps a channel, mask 0 leaves its bias.
            bias = layer.bias.view(1, -1, 1, 1)
            assert torch.allclose(layer(x), m.view(1, -1, 1, 1) * (plain - bias) + bias, atol=1e-5)
            # Perturbed: the layer as if run with weight * (m + d_w) and bias * (1 + d_b).
            neurons.perturbed = True
            weight = layer.weight * (m + d_w).view(-1, *[1] * (layer.weight.dim() - 1))
            if isinstance(layer, torch.nn.Conv2d):
                expected = F.conv2d(x, weight, layer.bias * (1 + d_b))
            else:
                expected = F.batch_norm(x, layer.running_mean, layer.running_var, weight,
                                        layer.bias * (1 + d_b))
            assert torch.allclose(layer(x), expected, atol=1e-5)


def test_masks_go_on_batchnorm_layers_or_else_on_convolutions():
    resnet, cnn = build_model("small_resnet", 10, 1), build_model("small_cnn", 10, 1)
    assert anp.neuron_layers(resnet) and all(
        isinstance(resnet.get_submodule(n), torch.nn.BatchNorm2d) for n in anp.neuron_layers(resnet))
    assert anp.neuron_layers(cnn) == ["conv1", "conv2"]


def test_pruned_channels_output_only_their_bias_and_the_others_are_kept():
    torch.manual_seed(0)
    model = build_model("small_resnet", 10, 1).eval()
    with torch.no_grad():
        model.bn1.bias.normal_()
    mask = torch.ones(16)
    mask[[2, 5]] = 0.1  # below the threshold
    pruned = anp.prune(model, {"bn1": mask}, threshold=0.2)
    outputs, x = {}, torch.rand(8, 1, 28, 28)
    for name, m in (("original", model), ("pruned", pruned)):
        m.bn1.register_forward_hook(lambda _, __, out, name=name: outputs.__setitem__(name, out))
        m(x)
    for c in (2, 5):
        assert torch.allclose(outputs["pruned"][:, c], model.bn1.bias[c].expand(8, 28, 28))
    kept = [c for c in range(16) if c not in (2, 5)]
    assert torch.equal(outputs["pruned"][:, kept], outputs["original"][:, kept])
    assert torch.equal(model.bn1.weight[[2, 5]] != 0, torch.tensor([True, True]))  # input untouched


@pytest.mark.parametrize("arch", ["small_cnn", "small_resnet"])
def test_anp_trains_masks_in_the_unit_interval_and_prunes_a_copy(arch, data):
    x, y = data
    model = build_model(arch, 10, 1).eval()
    masks = anp.optimise_masks(model, x, y, anp.QUICK, torch.Generator().manual_seed(0))
    assert set(masks) == set(anp.neuron_layers(model))
    assert all(((m >= 0) & (m <= 1)).all() for m in masks.values())
    assert any((m < 1).any() for m in masks.values())  # the masks moved
    defended, _ = anp.defend(model, x, y, 10, quick=True)
    assert defended is not model and not any(m._forward_hooks for m in defended.modules())


# BAERASE-paper

def patch_trigger(target: int, shape=(1, 16, 16)) -> baerase_paper.PatchTrigger:
    family = PatchFamily(shape, 3)
    return baerase_paper.PatchTrigger(target, family, baerase_paper.PatchGenerators(1, 12, 8, family.dim),
                                      asr=1.0)


def test_one_class_cut_out_of_the_batched_generators_makes_the_same_triggers():
    generators = baerase_paper.PatchGenerators(4, 12, 8, 27)
    with torch.no_grad():
        generators.base.normal_()
        z = generators.noise(5)
        together = generators(z)
        alone = generators.row(2)(z[2:3])
    assert alone.shape == (1, 5, 27)
    assert torch.allclose(alone[0], together[2])


def test_detection_flags_the_highest_asr_outlier_without_any_floor():
    assert baerase_paper.flagged_target([0.02] * 9 + [0.9], 2.0) == 9
    assert baerase_paper.flagged_target([0.3] * 10, 2.0) is None
    # The paper's weakness, kept on purpose: near-zero ASRs still produce a "backdoor".
    assert baerase_paper.flagged_target([0.0] * 9 + [0.03], 2.0) == 9


def test_ascent_lowers_the_target_probability_of_triggered_images(trained, data):
    x, y = data
    trigger = patch_trigger(3)
    others = x[y != 3]

    def target_probability(model):
        torch.manual_seed(0)
        with torch.no_grad():
            return model(trigger.stamp(others)).softmax(1)[:, 3].mean().item()

    s = dataclasses.replace(baerase_paper.FULL, lr=1e-3, epochs=1)  # the paper's a and lambda
    unlearnt = baerase_paper.unlearn(trained, trigger, x, y, s, torch.Generator().manual_seed(0))
    assert target_probability(unlearnt) < target_probability(trained)


def test_nothing_flagged_returns_an_unchanged_copy(trained, data, monkeypatch):
    x, y = data
    monkeypatch.setattr(baerase_paper, "recover", lambda *args: [
        dataclasses.replace(patch_trigger(c), asr=0.1) for c in range(10)])
    defended, findings = baerase_paper.defend(trained, x, y, 10, quick=True)
    assert defended is not trained and same_weights(defended, trained) and findings == {"flagged": []}


def test_baerase_paper_runs_every_step_on_a_real_model(trained, data):
    x, y = data
    defended, _ = baerase_paper.defend(trained, x, y, 10, quick=True)
    assert defended is not trained and not defended.training
    assert all(torch.isfinite(p).all() for p in defended.parameters())
