"""Trigger recovery: one max-entropy trigger generator per candidate target class.

For class c a generator G_c maps noise z ~ U[0,1]^Z to a trigger. It is trained to make the
frozen model predict c on clean images stamped with the trigger, while MINE (a statistics network
T_c estimating I(z; G_c(z)) by the Donsker-Varadhan bound) rewards it for spreading over many
different valid triggers instead of collapsing onto one:

    L_G = -mean(min(log p_c(x (+) G(z)), log beta)) + lambda * size(G(z)) - alpha * I(z; G(z))

All K generators are trained together: one step stamps every class's triggers on the same clean
batch and runs the model once over the K stacked copies.

Three trigger families (the paper's random-position patch cannot express fixed-position, blended or
full-image triggers):
- PatchFamily: a k x k patch pasted at a random position of each image (position-invariant triggers);
- MaskFamily: a full-image mask m and pattern p, x' = (1 - m) x + m p, with an L1 penalty on m;
- BlendFamily: x' = (1 - a) x + a p, one blend factor a per class over a full-image pattern p,
  penalised like the mask (faint triggers spread over the whole image).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from .config import RecoveryConfig


class BatchedLinear(nn.Module):
    """K independent linear layers applied to K batches at once: (K, B, fan_in) -> (K, B, fan_out)."""

    def __init__(self, k: int, fan_in: int, fan_out: int, scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, fan_in, fan_out) * scale / math.sqrt(fan_in))
        self.bias = nn.Parameter(torch.zeros(k, 1, fan_out))

    def forward(self, x: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        if rows is None:
            return torch.baddbmm(self.bias, x, self.weight)
        return torch.baddbmm(self.bias[rows], x, self.weight[rows])

    def select(self, rows: list[int]) -> "BatchedLinear":
        part = BatchedLinear(len(rows), self.weight.shape[1], self.weight.shape[2])
        part.weight.data.copy_(self.weight.data[rows])
        part.bias.data.copy_(self.bias.data[rows])
        return part


class TriggerGenerator(nn.Module):
    """K MLP generators. As in MESA, the noise is cut into one chunk per layer and fed to each.

    The output is sigmoid(base + MLP(z)): ``base`` is each class's central trigger, learnt at a
    high rate as in Neural Cleanse's direct search, and the MLP spreads triggers around it. The
    first ``fixed`` outputs are sigmoid(base) alone, the same for every z (the blend factor).
    """

    def __init__(self, k: int, noise_dim: int, hidden: int, out_dim: int, layers: int = 3,
                 fixed: int = 0):
        super().__init__()
        self.noise_dim, self.chunk, self.fixed = noise_dim, noise_dim // layers, fixed
        self.base = nn.Parameter(torch.zeros(k, 1, out_dim))
        widths = [0] + [hidden] * (layers - 1)
        self.layers = nn.ModuleList(
            BatchedLinear(k, widths[i] + self.chunk, hidden if i < layers - 1 else out_dim - fixed,
                          scale=1.0 if i < layers - 1 else 0.1)
            for i in range(layers)
        )

    def forward(self, z: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """z (K, B, noise_dim) -> trigger parameters in [0, 1], (K, B, out_dim); with rows,
        only those generators run and z holds one batch per row."""
        h = None
        for i, layer in enumerate(self.layers):
            chunk = z[..., i * self.chunk:(i + 1) * self.chunk]
            h = layer(chunk if h is None else torch.cat([h, chunk], -1), rows)
            if i < len(self.layers) - 1:
                h = F.leaky_relu(h, 0.2)
        h = F.pad(h, (self.fixed, 0))
        return torch.sigmoid(h + (self.base if rows is None else self.base[rows]))

    def noise(self, k: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = self.layers[0].weight.device
        return torch.rand(k, n, self.noise_dim, generator=generator).to(device)

    def select(self, rows: list[int]) -> "TriggerGenerator":
        part = TriggerGenerator.__new__(TriggerGenerator)
        nn.Module.__init__(part)
        part.noise_dim, part.chunk, part.fixed = self.noise_dim, self.chunk, self.fixed
        part.base = nn.Parameter(self.base.data[rows].clone())
        part.layers = nn.ModuleList(layer.select(rows) for layer in self.layers)
        return part.to(self.layers[0].weight.device)


class StatisticsNetwork(nn.Module):
    """MINE's T_c(z, t) for K classes at once."""

    def __init__(self, k: int, noise_dim: int, trigger_dim: int, hidden: int = 128):
        super().__init__()
        self.fc1 = BatchedLinear(k, noise_dim + trigger_dim, hidden)
        self.fc2 = BatchedLinear(k, hidden, 1)

    def forward(self, z: torch.Tensor, t: torch.Tensor, rows: list[int] | None = None):
        return self.fc2(F.elu(self.fc1(torch.cat([z, t], -1), rows)), rows).squeeze(-1)


class MutualInformation:
    """Donsker-Varadhan estimate of I(z; t) per class, with MINE's moving-average correction."""

    def __init__(self, statistics: StatisticsNetwork, rate: float = 0.01):
        self.statistics, self.rate = statistics, rate
        self.moving_exp: torch.Tensor | None = None

    def estimate(self, z: torch.Tensor, t: torch.Tensor, rows: list[int] | None = None):
        """Lower bound on I(z; t) per class, differentiable in t: (K,)."""
        shuffled = z[:, torch.randperm(z.shape[1], device=z.device)]
        joint = self.statistics(z, t, rows).mean(1)
        marginal = torch.logsumexp(self.statistics(shuffled, t, rows), 1) - math.log(z.shape[1])
        return joint - marginal

    def statistics_loss(self, z: torch.Tensor, t: torch.Tensor, rows: list[int] | None = None):
        """Loss that trains T to tighten the bound; the moving average of E[e^T] in the
        denominator removes the bias of the plain minibatch gradient."""
        t = t.detach()
        shuffled = z[:, torch.randperm(z.shape[1], device=z.device)]
        joint = self.statistics(z, t, rows).mean(1)
        exp_marginal = self.statistics(shuffled, t, rows).exp().mean(1)
        k = self.statistics.fc2.weight.shape[0]
        if self.moving_exp is None:
            self.moving_exp = torch.ones(k, device=z.device)
        rows = list(range(k)) if rows is None else rows
        moving = (1 - self.rate) * self.moving_exp[rows] + self.rate * exp_marginal.detach()
        self.moving_exp[rows] = moving
        return -(joint - exp_marginal / moving).sum()


class PatchFamily:
    """A k x k x C patch pasted at a uniformly random position of every image."""

    name = "patch"
    scale = "area"  # a patch is a mask of fixed size, placed anywhere
    fixed_dim = 0  # leading trigger values that are the same for all of a class's triggers

    def __init__(self, shape: tuple[int, int, int], patch_size: int):
        self.channels, self.height, self.width = shape
        self.k = patch_size
        self.dim = self.channels * patch_size * patch_size

    def stamp(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n, k = x.shape[0], self.k
        patch = t.view(n, self.channels, k, k)
        top = torch.randint(0, self.height - k + 1, (n, 1, 1), device=x.device)
        left = torch.randint(0, self.width - k + 1, (n, 1, 1), device=x.device)
        rows = top + torch.arange(k, device=x.device).view(1, k, 1)
        cols = left + torch.arange(k, device=x.device).view(1, 1, k)
        where = torch.zeros(n, self.height, self.width, device=x.device, dtype=torch.bool)
        index = (torch.arange(n, device=x.device).view(n, 1, 1), rows, cols)
        where = where.index_put(index, torch.ones((), dtype=torch.bool, device=x.device))
        canvas = x.permute(0, 2, 3, 1).index_put(index, patch.permute(0, 2, 3, 1))
        return torch.where(where.unsqueeze(1), canvas.permute(0, 3, 1, 2), x)

    def size(self, t: torch.Tensor) -> torch.Tensor:
        """Share of the image the trigger covers, per trigger."""
        return torch.full(t.shape[:-1], self.k * self.k / (self.height * self.width), device=t.device)

    def split(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pattern": t.view(-1, self.channels, self.k, self.k)}

    def capped(self, max_size: float) -> "PatchFamily":
        return self  # a patch has a fixed size already


class MaskFamily:
    """x' = (1 - m) * x + m * p, with a full-image mask m (H x W) and pattern p (C x H x W)."""

    name = "mask"
    scale = "area"  # what size measures: detection compares sizes of one scale only
    uniform = False  # one mask value for the whole image (the blend family)
    fixed_dim = 0

    def __init__(self, shape: tuple[int, int, int], max_size: float | None = None):
        self.channels, self.height, self.width = shape
        self.mask_shape = (1, 1) if self.uniform else (self.height, self.width)
        self.mask_dim = math.prod(self.mask_shape)
        self.dim = self.mask_dim + self.channels * self.height * self.width
        self.max_size = max_size  # masks larger than this (mean) are scaled down

    def stamp(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        parts = self.split(t)
        return x + parts["mask"] * (parts["pattern"] - x)

    def size(self, t: torch.Tensor) -> torch.Tensor:
        size = t[..., : self.mask_dim].mean(-1)
        return size if self.max_size is None else size.clamp(max=self.max_size)

    def split(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = t[..., : self.mask_dim].reshape(-1, 1, *self.mask_shape)
        if self.max_size is not None:
            mask = mask * (self.max_size / mask.mean((1, 2, 3), keepdim=True)).clamp(max=1)
        pattern = t[..., self.mask_dim:].reshape(-1, self.channels, self.height, self.width)
        return {"mask": mask, "pattern": pattern}

    def capped(self, max_size: float) -> "MaskFamily":
        return type(self)((self.channels, self.height, self.width), max_size)


class BlendFamily(MaskFamily):
    """x' = (1 - a) * x + a * p: one blend factor a for the whole image and a full pattern p.

    The mask family with a 1 x 1 mask broadcast over the image, so its size is a. A blended
    trigger (a faint pattern over every pixel) is a large mask by L1 and never stands out there;
    measured by its blend factor, a backdoor target needs a far fainter pattern than other classes.
    """

    name = "blend"
    scale = "blend factor"
    uniform = True
    # One blend factor per class, not per z: noise-driven blend factors swing with the MLP and
    # give MINE an easy, useless source of diversity; the patterns still vary with z.
    fixed_dim = 1


@dataclass
class RecoveredTrigger:
    """The generator of one class, with what it achieved on the held-out split."""

    target: int
    family: PatchFamily | MaskFamily
    generator: TriggerGenerator  # a single-class generator (K = 1)
    asr: float  # share of held-out non-target images it sends to the target
    size: float  # mean share of the image it covers
    penalty: float  # the size penalty the search ended with

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.generator(self.generator.noise(1, n, generator))[0]

    def stamp(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.family.stamp(x, self.sample(len(x)) if t is None else t)


def default_patch_size(height: int, width: int) -> int:
    return max(3, round(min(height, width) / 9))


class TriggerTrainer:
    """Trains K generators (and their MINE statistics networks) against a frozen model.

    Per class it keeps exponential averages of the batch ASR and trigger size, and Neural
    Cleanse's penalty schedule: the size penalty rises while the trigger works and falls while it
    does not, so each class settles near its smallest working trigger.
    """

    def __init__(self, generator: TriggerGenerator, family, cfg: RecoveryConfig, penalty: float):
        self.generator, self.family, self.cfg = generator, family, cfg
        k = generator.base.shape[0]
        device = generator.base.device
        self.mine = MutualInformation(StatisticsNetwork(k, cfg.noise_dim, family.dim).to(device))
        self.opt_g = torch.optim.Adam([
            {"params": [generator.base], "lr": cfg.base_lr, "betas": (0.5, 0.9)},
            {"params": generator.layers.parameters()},
        ], lr=cfg.lr, betas=(0.5, 0.999))
        self.opt_t = torch.optim.Adam(self.mine.statistics.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.penalty = torch.full((k,), penalty, device=device)
        self.asr = torch.zeros(k)  # moving averages
        self.size = torch.ones(k)
        self.batch_asr = torch.zeros(k)  # of the last step alone

    def step(self, model, x: torch.Tensor, y: torch.Tensor, rows: list[int], targets: list[int]):
        """One update of the generators in ``rows``, whose target classes are ``targets``."""
        cfg, k, b = self.cfg, len(rows), len(x)
        z = self.generator.noise(k, b)
        t = self.generator(z, rows)
        triggered = self.family.stamp(x.repeat(k, 1, 1, 1), t.reshape(k * b, -1))
        logits = model(triggered).view(k, b, -1)
        target = torch.tensor(targets, device=x.device).view(k, 1)
        log_prob = logits.log_softmax(-1).gather(2, target.unsqueeze(-1).expand(k, b, 1)).squeeze(-1)
        others = (y.view(1, -1) != target).float()
        count = others.sum(1).clamp(min=1)
        # The hinge on log p (not p) keeps a gradient while the target is still far away.
        hinge = (log_prob.clamp(max=math.log(cfg.hinge)) * others).sum(1) / count
        size = self.family.size(t).mean(1)
        mi = self.mine.estimate(z, t, rows)
        loss = (-hinge + self.penalty[rows] * size - cfg.mi_weight * mi).sum()
        self.opt_g.zero_grad(set_to_none=False)
        loss.backward()
        self.opt_g.step()
        with torch.no_grad():  # keep the sigmoid out of saturation, where gradients vanish
            self.generator.base.clamp_(-4, 4)
        self.opt_t.zero_grad(set_to_none=False)
        self.mine.statistics_loss(z, t, rows).backward()
        self.opt_t.step()

        with torch.no_grad():
            hits = ((logits.argmax(-1) == target).float() * others).sum(1) / count
            for j, c in enumerate(rows):
                self.batch_asr[c] = hits[j].item()
                self.asr[c] = 0.9 * self.asr[c] + 0.1 * hits[j].item()
                self.size[c] = 0.9 * self.size[c] + 0.1 * size[j].item()
                self.penalty[c] *= 1.08 if self.asr[c] >= cfg.success_asr else 1 / 1.12


def recover_triggers(model, family, x_train, y_train, x_hold, y_hold, num_classes: int,
                     cfg: RecoveryConfig, on_step=None) -> list[RecoveredTrigger]:
    """Train one generator per class for one family; return each class's held-out result.

    Each class ends with the generator of its smallest trigger that still held the target (the
    penalty schedule oscillates around that point, so the last step is rarely the best).
    Classes stop early (see stopping_classes).
    """
    device = x_train.device
    generator = TriggerGenerator(num_classes, cfg.noise_dim, cfg.hidden, family.dim,
                                 fixed=family.fixed_dim).to(device)
    trainer = TriggerTrainer(generator, family, cfg, cfg.mask_penalty)
    active = list(range(num_classes))
    best_size = torch.ones(num_classes)
    last_improved = torch.zeros(num_classes)
    best_state: dict[int, list[torch.Tensor]] = {}
    screening_step = int(cfg.steps * 0.3)

    for step in range(cfg.steps):
        idx = torch.randint(0, len(x_train), (cfg.batch_size,), device=device)
        trainer.step(model, x_train[idx], y_train[idx], active, active)
        for c in active:
            # The average lags: while a mask collapses it still looks fine, so the last batch
            # must hold the target too.
            working = min(trainer.asr[c], trainer.batch_asr[c]) >= cfg.success_asr
            if working and trainer.size[c] < best_size[c]:
                if trainer.size[c] < best_size[c] * 0.98:
                    last_improved[c] = step
                best_size[c] = trainer.size[c]
                best_state[c] = [p.data[c].clone() for p in generator.parameters()]
        for c in stopping_classes(family.name, active, step, screening_step, trainer.asr,
                                  trainer.size, last_improved, cfg):
            active.remove(c)
            # Adam would keep moving a stopped row; keep what it had if nothing better was seen.
            best_state.setdefault(c, [p.data[c].clone() for p in generator.parameters()])
        if on_step:
            on_step(step + 1, cfg.steps)
        if not active:
            break

    with torch.no_grad():
        for c, values in best_state.items():
            for p, v in zip(generator.parameters(), values):
                p.data[c] = v
    return [evaluate_generator(model, family, generator.select([c]), c, float(trainer.penalty[c]),
                               x_hold, y_hold)
            for c in range(num_classes)]


SCREEN_KEEP = 3  # mask searches that always survive screening


def stopping_classes(family: str, rows: list[int], step: int, screening_step: int, asr_ema,
                     size_ema, last_improved, cfg: RecoveryConfig) -> list[int]:
    """Which of the running classes stop after this step.

    - converged: the trigger holds the target and has not shrunk for 40 steps although the size
      penalty kept rising meanwhile;
    - failed (at screening): a search that cannot reach half the images by now won't; a
      fixed-size patch cannot grow, and a mask or blend that does not work has no size to compare;
    - clearly clean (mask and blend, at screening): a trigger still larger than a share of the
      median size is no backdoor; only the small ones (and always the smallest few, as some
      backdoors need more steps to stand out) are worth the rest of the steps. Failed searches
      count as needing the whole image, as in detection: shrinking a mask that does not work
      is no sign of a backdoor.
    """
    stopped = []
    failed = asr_ema < 0.5
    sizes = torch.where(failed, 1.0, size_ema)
    median = float(sizes.median())
    smallest = set(sizes.argsort()[:SCREEN_KEEP].tolist())
    for c in rows:
        working = asr_ema[c] >= cfg.success_asr
        if working and step - last_improved[c] > 40:
            stopped.append(c)
        elif step == screening_step and failed[c]:
            stopped.append(c)
        elif (step == screening_step and family != "patch" and c not in smallest
              and sizes[c] > cfg.screen_ratio * median):
            stopped.append(c)
    return stopped


@torch.no_grad()
def evaluate_generator(model, family, generator: TriggerGenerator, target: int, penalty: float,
                       x_hold, y_hold) -> RecoveredTrigger:
    trigger = RecoveredTrigger(target, family, generator, asr=0.0, size=0.0, penalty=penalty)
    x = x_hold[y_hold != target]
    t = trigger.sample(len(x))
    trigger.asr = (model(family.stamp(x, t)).argmax(-1) == target).float().mean().item() if len(x) else 0.0
    trigger.size = family.size(t).mean().item()
    return trigger
