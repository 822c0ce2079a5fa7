"""BAERASE as published: Liu et al., "Backdoor Defense with Machine Unlearning" (INFOCOM 2022),
in its original configuration, so that the bench shows what the service's fixes buy
(docs/method.md; the design note's "Step 1", "Step 2" and "Measured: the paper's configuration").

1. Recovery: for every class c a max-entropy generator G_c of 3x3 patch triggers pasted at a
   random position, trained to send clean images to c while MINE rewards I(z; G_c(z)); all
   classes are trained side by side for a fixed number of steps: no smallest-trigger search, no
   screening, no early stop, no other trigger family.
2. Detection: the class whose triggers reach the highest held-out ASR, if the plain MAD anomaly
   index calls it an outlier (> 2), without the service's absolute floors.
3. Unlearning: L = a * CE(f(x), y) - CE(f(x (+) t), c) + lambda * ||theta - theta0||_1 with fresh
   triggers t each batch: an unbounded ascent, SGD, BatchNorm in training mode as in the paper's
   code, for a fixed number of epochs (the paper stops on the TRUE trigger's ASR, an oracle).

The baseline is self-contained so that changes to the service's method cannot move it: from the
engine it takes only generic pieces (BatchedLinear, the noise-fed MLP body, MutualInformation,
PatchFamily and stratified_split).

Departures from the paper: the generator is an MLP without BatchNorm (fed one chunk of the noise
per layer, as in MESA) plus a learnt per-class centre (base) that moves at the MLP's own rate, so
it stays close to a plain MLP; this is the shape the bench measured from the start, kept so that
results stay comparable. The hinge is min(log p_c, log beta) instead of min(p_c, beta). Scaled
down for the CPU: recovery takes the paper's number of generator steps (~10 epochs of batches of
128 over 2,400 images: 190 steps) on batches of 32 images per class (with 64, recovery alone took
3 minutes of one core on the small CNN); everything else is the paper's.
"""

import copy
import math
import statistics
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from worker.sanitize.pipeline import stratified_split
from worker.sanitize.recovery import (BatchedLinear, MutualInformation, PatchFamily, noise_fed_layers,
                                      run_noise_fed)

from .common import trainable_copy


@dataclass(frozen=True)
class RecoverySettings:
    patch_size: int = 3
    steps: int = 190
    batch_size: int = 32  # clean images per class per step
    noise_dim: int = 64
    hidden: int = 512
    layers: int = 3
    lr: float = 2e-4
    mi_weight: float = 0.1  # alpha
    hinge: float = 0.5  # beta
    mine_rate: float = 0.001  # moving average of E[e^T] in MINE's bias correction
    statistics_hidden: int = 128
    statistics_lr: float = 2e-4


@dataclass(frozen=True)
class Settings:
    recovery: RecoverySettings = field(default_factory=RecoverySettings)
    holdout_fraction: float = 0.2  # of the clean set, for the ASRs detection compares
    anomaly_index: float = 2.0
    clean_weight: float = 100.0  # a
    l1_weight: float = 1e-6  # lambda
    lr: float = 1e-4
    epochs: int = 10
    batch_size: int = 128  # assumed the same as the paper's generator batch
    images: int | None = None  # use only the first N clean images (quick runs)


FULL = Settings()
QUICK = Settings(recovery=replace(RecoverySettings(), steps=10, batch_size=8),
                 epochs=1, batch_size=64, images=256)


class PatchGenerators(nn.Module):
    """K generators, one per class, run as one batched MLP: noise (K, B, noise_dim) -> raw patch
    parameters (K, B, patch values), which PatchFamily.stamp maps to pixels with a sigmoid.

    Every parameter's first dimension is the class, so ``row(c)`` can cut out one generator.
    """

    def __init__(self, k: int, noise_dim: int, hidden: int, out_dim: int, layers: int = 3):
        super().__init__()
        self.noise_dim = noise_dim
        self.base = nn.Parameter(torch.zeros(k, 1, out_dim))
        self.layers = noise_fed_layers(k, noise_dim, hidden, out_dim, layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return run_noise_fed(self.layers, z) + self.base

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = self.base.shape[0]
        return torch.rand(k, n, self.noise_dim, generator=generator).to(self.base.device)

    def row(self, c: int) -> "PatchGenerators":
        """Class c's generator alone (K = 1)."""
        part = copy.deepcopy(self)
        for p in part.parameters():
            p.data = p.data[c:c + 1].clone()
        return part


class StatisticsNetworks(nn.Module):
    """MINE's T_c(z, t) for each of K classes: (K, B, ...) -> (K, B)."""

    def __init__(self, k: int, noise_dim: int, trigger_dim: int, hidden: int):
        super().__init__()
        self.fc1 = BatchedLinear(k, noise_dim + trigger_dim, hidden)
        self.fc2 = BatchedLinear(k, hidden, 1)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.elu(self.fc1(torch.cat([z, t], -1)))).squeeze(-1)


@dataclass
class PatchTrigger:
    """One class's generator, and the share of held-out images of other classes it sends there."""

    target: int
    family: PatchFamily
    generator: PatchGenerators  # K = 1
    asr: float = 0.0

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.generator(self.generator.noise(n, generator))[0]

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """x with a fresh trigger on every image."""
        return self.family.stamp(x, self.sample(len(x)))


def train_generators(model: nn.Module, family: PatchFamily, x: torch.Tensor, y: torch.Tensor,
                     num_classes: int, s: RecoverySettings) -> PatchGenerators:
    """Every class's generator against the frozen model, for ``s.steps`` steps of

        L_G = -mean(min(log p_c(x (+) G_c(z)), log beta)) - alpha * I(z; G_c(z))

    Each step stamps all classes' triggers on the same clean batch and runs the model once.
    """
    k, b = num_classes, s.batch_size
    generator = PatchGenerators(k, s.noise_dim, s.hidden, family.dim, s.layers).to(x.device)
    statistics_net = StatisticsNetworks(k, s.noise_dim, family.dim, s.statistics_hidden)
    mine = MutualInformation(statistics_net.to(x.device), rate=s.mine_rate)
    opt_g = torch.optim.Adam([
        {"params": [generator.base], "betas": (0.5, 0.9)},
        {"params": generator.layers.parameters()},
    ], lr=s.lr, betas=(0.5, 0.999))
    opt_t = torch.optim.Adam(mine.statistics.parameters(), lr=s.statistics_lr, betas=(0.5, 0.999))
    targets = torch.arange(k, device=x.device).view(k, 1)

    for _ in range(s.steps):
        idx = torch.randint(0, len(x), (b,))
        xb, yb = x[idx], y[idx]
        z = generator.noise(b)
        raw = generator(z)
        logits = model(family.stamp(xb.repeat(k, 1, 1, 1), raw.reshape(k * b, -1))).view(k, b, -1)
        log_p = logits.log_softmax(-1).gather(2, targets.expand(k, b).unsqueeze(-1)).squeeze(-1)
        # Images already of class c say nothing about a trigger for c.
        others = (yb.view(1, -1) != targets).float()
        # The hinge on log p (not p) keeps a gradient while the target is still far away.
        hinge = (log_p.clamp(max=math.log(s.hinge)) * others).sum(1) / others.sum(1).clamp(min=1)
        patches = torch.sigmoid(raw)  # MINE measures the spread of the pixels, not of the logits
        loss = (-hinge - s.mi_weight * mine.estimate(z, patches)).sum()
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        with torch.no_grad():  # keep the sigmoid out of saturation, where gradients vanish
            generator.base.clamp_(-4, 4)
        opt_t.zero_grad()
        mine.statistics_loss(z, patches).backward()
        opt_t.step()
    return generator


@torch.no_grad()
def held_out_asr(model: nn.Module, trigger: PatchTrigger, x: torch.Tensor, y: torch.Tensor) -> float:
    others = x[y != trigger.target]
    if not len(others):
        return 0.0
    return (model(trigger.stamp(others)).argmax(-1) == trigger.target).float().mean().item()


def recover(model: nn.Module, x_train, y_train, x_hold, y_hold, num_classes: int,
            s: RecoverySettings) -> list[PatchTrigger]:
    """One patch-trigger generator per class, each scored by its ASR on the held-out split."""
    family = PatchFamily(tuple(x_train.shape[1:]), s.patch_size)
    generators = train_generators(model, family, x_train, y_train, num_classes, s)
    triggers = []
    for c in range(num_classes):
        trigger = PatchTrigger(c, family, generators.row(c))
        trigger.asr = held_out_asr(model, trigger, x_hold, y_hold)
        triggers.append(trigger)
    return triggers


MAD_TO_SIGMA = 1.4826  # makes the MAD of a normal sample estimate its standard deviation


def anomaly_indices(values: list[float]) -> list[float]:
    """How many robust standard deviations each value lies ABOVE the median. With no spread at
    all any gap counts as huge: the service guards against that with floors, the paper does not."""
    median = statistics.median(values)
    mad = MAD_TO_SIGMA * statistics.median(abs(v - median) for v in values)
    return [(v - median) / max(mad, 1e-6) for v in values]


def flagged_target(asrs: list[float], threshold: float) -> int | None:
    """The class of highest recovered ASR if MAD calls it an outlier; no absolute floor."""
    indices = anomaly_indices(asrs)
    best = max(range(len(asrs)), key=asrs.__getitem__)
    return best if indices[best] > threshold else None


def ascent_loss(model: nn.Module, trigger: PatchTrigger, x, y, anchor: list[torch.Tensor],
                s: Settings) -> torch.Tensor:
    clean = F.cross_entropy(model(x), y)
    target = torch.full_like(y, trigger.target)
    triggered = F.cross_entropy(model(trigger.stamp(x)), target)  # fresh triggers every call
    l1 = sum((p - p0).abs().sum() for p, p0 in zip(model.parameters(), anchor))
    return s.clean_weight * clean - triggered + s.l1_weight * l1


def unlearn(model: nn.Module, trigger: PatchTrigger, x, y, s: Settings,
            rng: torch.Generator) -> nn.Module:
    model = trainable_copy(model)
    anchor = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=0.9)
    model.train()  # the paper's code unlearns with BatchNorm in training mode
    for _ in range(s.epochs):
        for idx in torch.randperm(len(x), generator=rng).split(s.batch_size):
            opt.zero_grad()
            ascent_loss(model, trigger, x[idx], y[idx], anchor, s).backward()
            opt.step()
    return model.eval()


def defend(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, seed: int = 0,
           quick: bool = False) -> tuple[nn.Module, dict]:
    s = QUICK if quick else FULL
    x, y = x[:s.images], y[:s.images]
    torch.manual_seed(seed)  # the generators draw noise and patch positions from the global RNG
    train, hold = stratified_split(y, s.holdout_fraction, seed)
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    triggers = recover(frozen, x[train], y[train], x[hold], y[hold], num_classes, s.recovery)
    target = flagged_target([t.asr for t in triggers], s.anomaly_index)
    if target is None:
        return trainable_copy(model).eval(), {"flagged": []}
    return unlearn(model, triggers[target], x[train], y[train], s,
                   torch.Generator().manual_seed(seed)), {"flagged": [target]}
