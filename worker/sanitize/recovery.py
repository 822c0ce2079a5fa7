"""Trigger recovery: for every class, the smallest trigger of each family (mask, blend, warp,
patch) that sends clean images there, found by Neural Cleanse's search with K-Arm-style pruning
(``search_triggers``) and sized on held-out images (``budget``); then, for the classes detection
flags, the paper's max-entropy generator of such triggers (``train_generator``).
docs/method.md, section 2, explains the method and the measurements behind it.
"""

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
import torch.nn.functional as F

from .config import RecoveryConfig


class Family(Protocol):
    """What every trigger family provides: ``dim`` unconstrained parameters per trigger, how they
    stamp a batch of images, and how large the trigger is on the family's own scale."""

    name: str
    scale: str  # what size measures
    whole: float  # the size that stands for "the whole image": a search that never worked
    dim: int

    def initial(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """(k, dim) starting parameters for k searches."""

    def stamp(self, x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """Images x (N, C, H, W) with the triggers raw (N, dim) applied."""

    def size(self, raw: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (...): each trigger's size; the search penalises it."""

    def shifted(self, raw: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
        """The same triggers moved by (dy, dx) pixels, where moving means anything."""

    def at_strength(self, x: torch.Tensor, raw: torch.Tensor, strength: float) -> torch.Tensor:
        """Images x with one trigger raw (1, dim) applied in its own shape at the given size
        (on the family's scale), so that one trigger can be measured at every size."""


class MaskFamily:
    name = "mask"
    scale = "area"  # what size measures
    whole = 1.0  # the size that stands for "the whole image": a search that never worked

    def __init__(self, shape: tuple[int, int, int]):
        self.channels, self.height, self.width = shape
        self.mask_dim = self.mask_elements()
        self.dim = self.mask_dim + self.channels * self.height * self.width

    def mask_elements(self) -> int:
        return self.height * self.width

    def initial(self, k: int, generator: torch.Generator) -> torch.Tensor:
        # As Neural Cleanse: a near-full mask (sigmoid(2) = 0.88) that flips images to any class
        # from the first step, so every class's search works and shrinks; a search that starts
        # small stalls for natural classes, and "never worked" says nothing about their size.
        mask = torch.full((k, self.mask_dim), 2.0)
        pattern = torch.randn(k, self.dim - self.mask_dim, generator=generator)
        return torch.cat([mask, pattern], 1)

    def split(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """raw (N, dim) -> mask (N, 1, h, w) and pattern (N, C, H, W), both in [0, 1]."""
        side = (1, 1) if self.mask_dim == 1 else (self.height, self.width)
        mask = torch.sigmoid(raw[:, : self.mask_dim]).view(-1, 1, *side)
        pattern = torch.sigmoid(raw[:, self.mask_dim:]).view(-1, self.channels, self.height, self.width)
        return {"mask": mask, "pattern": pattern}

    def stamp(self, x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        parts = self.split(raw)
        return x + parts["mask"] * (parts["pattern"] - x)

    def size(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(raw[..., : self.mask_dim]).mean(-1)

    def at_strength(self, x: torch.Tensor, raw: torch.Tensor, strength: float) -> torch.Tensor:
        # The trigger's most important pixels, as many as the size says, at full strength.
        parts = self.split(raw)
        order = parts["mask"].flatten().argsort(descending=True)
        mask = torch.zeros(order.numel(), device=x.device)
        mask[order[: round(strength * order.numel())]] = 1
        return x + mask.view(1, 1, self.height, self.width) * (parts["pattern"] - x)

    def shifted(self, raw: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
        """The same trigger moved by (dy, dx) pixels."""
        side = (1, 1) if self.mask_dim == 1 else (self.height, self.width)
        mask = raw[:, : self.mask_dim].view(-1, 1, *side)
        pattern = raw[:, self.mask_dim:].view(-1, self.channels, self.height, self.width)
        moved = [torch.roll(p, (dy, dx), dims=(2, 3)).flatten(1) for p in (mask, pattern)]
        return torch.cat(moved, 1)


class BlendFamily(MaskFamily):
    """One blend factor for the whole image: a faint pattern over every pixel is a large mask by
    area, so blended triggers are compared by their blend factor."""

    name = "blend"
    scale = "blend factor"

    def mask_elements(self) -> int:
        return 1

    def initial(self, k: int, generator: torch.Generator) -> torch.Tensor:
        return super().initial(k, generator)  # a = 0.88 to start, as the mask

    def at_strength(self, x: torch.Tensor, raw: torch.Tensor, strength: float) -> torch.Tensor:
        return x + strength * (self.split(raw)["pattern"] - x)


class WarpFamily:
    """A smooth warp: a grid x grid field of displacements (in pixels), upsampled bicubically."""

    name = "warp"
    scale = "displacement"

    def __init__(self, shape: tuple[int, int, int], grid: int = 4):
        self.channels, self.height, self.width = shape
        self.whole = max(self.height, self.width) / 4  # a warp this large scrambles the image
        self.grid = grid
        self.dim = 2 * grid * grid
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, self.height), torch.linspace(-1, 1, self.width),
                                    indexing="ij")
        self.identity = torch.stack((cols, rows), dim=-1)[None]  # grid_sample's (x, y) order

    def initial(self, k: int, generator: torch.Generator) -> torch.Tensor:
        return 0.1 * torch.randn(k, self.dim, generator=generator)

    def flow(self, raw: torch.Tensor) -> torch.Tensor:
        """(N, dim) -> displacements in pixels, (N, H, W, 2)."""
        coarse = raw.view(-1, 2, self.grid, self.grid)
        return F.interpolate(coarse, size=(self.height, self.width), mode="bicubic",
                             align_corners=True).permute(0, 2, 3, 1)

    def stamp(self, x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor([2 / max(1, self.width - 1), 2 / max(1, self.height - 1)], device=x.device)
        grid = self.identity.to(x.device) + self.flow(raw) * scale
        return F.grid_sample(x, grid, align_corners=True, padding_mode="border")

    def size(self, raw: torch.Tensor) -> torch.Tensor:
        flow = self.flow(raw.reshape(-1, self.dim))
        return flow.norm(dim=-1).mean((1, 2)).view(raw.shape[:-1])

    def at_strength(self, x: torch.Tensor, raw: torch.Tensor, strength: float) -> torch.Tensor:
        scaled = raw * (strength / self.size(raw).clamp(min=1e-6)).view(-1, 1)
        return self.stamp(x, scaled.expand(len(x), -1))

    def shifted(self, raw: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
        return raw  # a smooth warp moves every pixel already: shifting it changes nothing


class PatchFamily:
    """A k x k x C patch pasted at a uniformly random position of every image."""

    name = "patch"
    scale = "opacity"  # every patch has the same area: how opaque it must be tells classes apart
    whole = 1.0

    def __init__(self, shape: tuple[int, int, int], patch_size: int):
        self.channels, self.height, self.width = shape
        self.k = patch_size
        self.dim = self.channels * patch_size * patch_size

    def initial(self, k: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(k, self.dim, generator=generator)

    def split(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pattern": torch.sigmoid(raw).view(-1, self.channels, self.k, self.k)}

    def stamp(self, x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        n, k = x.shape[0], self.k
        patch = self.split(raw)["pattern"].expand(n, -1, -1, -1)
        top = torch.randint(0, self.height - k + 1, (n, 1, 1), device=x.device)
        left = torch.randint(0, self.width - k + 1, (n, 1, 1), device=x.device)
        rows = top + torch.arange(k, device=x.device).view(1, k, 1)
        cols = left + torch.arange(k, device=x.device).view(1, 1, k)
        index = (torch.arange(n, device=x.device).view(n, 1, 1), rows, cols)
        canvas = x.permute(0, 2, 3, 1).index_put(index, patch.permute(0, 2, 3, 1))
        return canvas.permute(0, 3, 1, 2)

    def size(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.full(raw.shape[:-1], self.k * self.k / (self.height * self.width), device=raw.device)

    def at_strength(self, x: torch.Tensor, raw: torch.Tensor, strength: float) -> torch.Tensor:
        # Every patch has the same area: its size is measured as how opaque it must be.
        return x + strength * (self.stamp(x, raw.expand(len(x), -1)) - x)

    def shifted(self, raw: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
        return raw  # lands at a random position anyway



def default_patch_size(height: int, width: int) -> int:
    return max(3, round(min(height, width) / 9))


def make_families(names: list[str], shape: tuple[int, int, int], patch_size: int | None) -> list[Family]:
    patch = patch_size or default_patch_size(shape[1], shape[2])
    build = {"mask": lambda: MaskFamily(shape), "blend": lambda: BlendFamily(shape),
             "warp": lambda: WarpFamily(shape), "patch": lambda: PatchFamily(shape, patch)}
    return [build[name]() for name in names]


@dataclass
class FoundTrigger:
    """The smallest working trigger the search found for one class in one family."""

    target: int
    family: Family
    raw: torch.Tensor  # (dim,) unconstrained parameters
    size: float  # its size (see the family); the family's ``whole`` if the search never worked
    screen_size: float  # its smallest working size after the first round, when all classes had equal steps
    worked: bool  # whether any batch ever held the target
    asr: float = 0.0  # on the held-out split (filled in by ``held_out_asr``)
    # Measured for candidates only (detection.py): they decide nothing, and cost held-out passes.
    shifted_asr: float | None = None  # the held-out ASR when moved by one pixel
    transfer_asr: float | None = None  # the held-out ASR on the reference model (reference.py)
    reference_size: float | None = None  # its budget on the reference model, where measured


def target_loss(logits: torch.Tensor, targets: torch.Tensor, y: torch.Tensor):
    """Per class (rows of logits (K, B, classes)): CE towards the class on the images of other
    classes, and the share of them it wins."""
    others = (y.view(1, -1) != targets.view(-1, 1)).float()
    count = others.sum(1).clamp(min=1)
    ce = F.cross_entropy(logits.transpose(1, 2), targets.view(-1, 1).expand(-1, logits.shape[1]),
                         reduction="none")
    hits = (logits.argmax(-1) == targets.view(-1, 1)).float()
    return (ce * others).sum(1) / count, (hits * others).sum(1) / count


def search_triggers(model, family: Family, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                    cfg: RecoveryConfig, seed: int, on_step=None) -> list[FoundTrigger]:
    """Neural Cleanse's smallest-trigger search for every class of one family, batched.

    Round 1 runs every class for ``cfg.screen_steps``; round 2 gives ``cfg.refine_steps`` more to
    the ``cfg.finalists`` classes with the smallest working triggers. Each class keeps the
    smallest trigger that held the target on a whole batch.
    """
    device = x.device
    g = torch.Generator().manual_seed(seed)
    raw = family.initial(num_classes, g).to(device)
    penalty = torch.full((num_classes,), cfg.init_penalty, device=device)
    up, down = torch.zeros(num_classes), torch.zeros(num_classes)
    best_size = torch.full((num_classes,), math.inf)
    asr_average = torch.zeros(num_classes)
    best_raw = raw.clone()
    total = cfg.screen_steps + cfg.refine_steps

    def run(rows: list[int], n_steps: int, start: int) -> None:
        nonlocal raw
        param = raw[rows].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([param], lr=cfg.lr, betas=(0.5, 0.9))
        targets = torch.tensor(rows, device=device)
        since_best = torch.zeros(len(rows))
        active = torch.ones(len(rows), dtype=torch.bool)
        for step in range(n_steps):
            idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g).to(device)
            xb, yb = x[idx], y[idx]
            live = active.nonzero().flatten()
            if len(live) == 0:
                break
            k = len(live)
            stamped = family.stamp(xb.repeat(k, 1, 1, 1), param[live].repeat_interleave(len(xb), 0))
            logits = model(stamped).view(k, len(xb), -1)
            ce, asr = target_loss(logits, targets[live], yb)
            size = family.size(param[live])
            loss = (ce + penalty[targets[live]] * size).sum()
            optimizer.zero_grad()
            loss.backward()
            param.grad[~active] = 0
            optimizer.step()
            with torch.no_grad():
                for j, i in enumerate(live.tolist()):
                    c = rows[i]
                    asr_average[c] = 0.7 * asr_average[c] + 0.3 * asr[j].item()
                    # One batch of a dozen images can be lucky: the recent average must agree.
                    works = min(asr[j].item(), asr_average[c].item()) >= cfg.success_asr
                    if works and size[j].item() < best_size[c]:
                        since_best[i] = 0 if size[j].item() < 0.98 * best_size[c] else since_best[i] + 1
                        best_size[c] = size[j].item()
                        best_raw[c] = param[i].detach()
                    else:
                        since_best[i] += 1
                    # Neural Cleanse's schedule: raise the penalty while the trigger keeps
                    # working, lower it faster while it does not.
                    up[c], down[c] = (up[c] + 1, 0) if works else (0, down[c] + 1)
                    if up[c] >= cfg.patience:
                        penalty[c], up[c] = penalty[c] * 1.5, 0
                    elif down[c] >= cfg.patience:
                        penalty[c], down[c] = penalty[c] / 1.5 ** 1.5, 0
                # A class whose smallest trigger has not shrunk for a while has converged.
                active &= ~((since_best >= cfg.converged_after) & best_size[rows].isfinite())
            if on_step:
                on_step(start + step + 1, total)
        raw[rows] = param.detach()

    everyone = list(range(num_classes))
    run(everyone, cfg.screen_steps, 0)
    screen_size = best_size.clamp(max=family.whole).tolist()
    ranking = sorted(everyone, key=lambda c: (best_size[c].item(), -asr_average[c].item()))
    run(ranking[: cfg.finalists], cfg.refine_steps, cfg.screen_steps)
    return [FoundTrigger(c, family, best_raw[c].clone(), min(best_size[c].item(), family.whole),
                         screen_size[c], worked=bool(best_size[c].isfinite()))
            for c in everyone]


@torch.no_grad()
def held_out_asr(model, trigger: FoundTrigger, x: torch.Tensor, y: torch.Tensor, shift: int = 0,
                 batch_size: int = 500) -> float:
    """Share of the held-out images of other classes that the trigger sends to its class."""
    others = x[y != trigger.target]
    if not len(others) or not trigger.worked:
        return 0.0
    raw = trigger.raw.view(1, -1)
    if shift:
        raw = trigger.family.shifted(raw, shift, shift)
    hits = sum((model(trigger.family.stamp(xb, raw.expand(len(xb), -1))).argmax(1) == trigger.target)
               .sum().item() for xb in others.split(batch_size))
    return hits / len(others)


@torch.no_grad()
def budget(model, trigger: FoundTrigger, x: torch.Tensor, y: torch.Tensor, success: float,
           max_images: int = 512, steps: int = 10, chunk: int = 32, error: float = 1e-3) -> float:
    """The smallest size at which the trigger, in its own shape (``Family.at_strength``), still
    sends ``success`` of the held-out images of other classes to its class; the family's
    ``whole`` if it falls short at every size tried. For the mask family: the fewest of its own
    pixels, its most important first, at full strength, as a share of the image.

    The bisection starts from the largest size that works, halving from the whole down to the
    trigger's size as found: many triggers fail at the whole size (at blend factor 1 the image is
    the pattern alone; a warp that large scrambles it) though they work as found. Left at the
    whole, half the blend triggers of a well-trained Trojan ResNet looked the least suspicious
    size there is, which lifted the family's median and put three ordinary classes over the
    flagging line; a WaNet ResNet's target (0.26 pixels as found) looked ordinary and the model
    `clean` (docs/population.md, seventeenth and eighteenth sittings).

    What detection compares is this, not the size the search ended at: a backdoor answers to a
    few saturated pixels, while a searched mask's L1 size also counts the faint pixels an
    unconverged search leaves behind. Half the images (``budget_asr``), not 90%: a weak backdoor
    (1% poisoning) flips 70-80% of images at most, and its budget must still be small. Measured
    on any model, so the same trigger can be sized on the reference model too (detection.py).

    The images are a fixed random draw of at most ``max_images``, counted in random order: users'
    samples often come sorted by class, and the first few hundred would be a few classes only."""
    family = trigger.family
    others = x[y != trigger.target]
    order = torch.randperm(len(others), generator=torch.Generator().manual_seed(trigger.target))
    others = others[order[:max_images].to(others.device)]
    if not len(others) or not trigger.worked:
        return family.whole
    raw, as_found = trigger.raw.view(1, -1), trigger.size
    total = len(others)
    needed = success * total

    # Hoeffding's bound for a draw without replacement (Serfling): after n images, the share among
    # all ``total`` lies within this of the share counted, except with probability ``error``.
    def margin(n: int) -> float:
        return math.sqrt(math.log(2 / error) / (2 * n) * (total - n) / max(1, total - 1))

    def reaches(strength: float) -> bool:
        # Most strengths of the bisection are far from the line: a few chunks settle them, and
        # only those near it are counted to the end.
        hits = seen = 0
        for xb in others.split(chunk):
            hits += (model(family.at_strength(xb, raw, strength)).argmax(1) == trigger.target).sum().item()
            seen += len(xb)
            if hits >= needed or seen - hits > total - needed:  # certain
                break
            if abs(hits / seen - success) > margin(seen):  # all but certain
                return hits / seen > success
        return hits >= needed

    largest = family.whole
    while not reaches(largest):
        if largest <= as_found:
            return family.whole
        largest = max(largest / 2, as_found)
    if family.name == "mask":  # whole pixels: search the count exactly
        pixels = family.height * family.width
        low, high = 0, max(1, round(largest * pixels))  # reaches(low) is false, reaches(high) true
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if reaches(middle / pixels) else (middle, high)
        return high / pixels
    low, high = 0.0, largest
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (low, middle) if reaches(middle) else (middle, high)
    return high


class BatchedLinear(nn.Module):
    """K independent linear layers applied to K batches at once: (K, B, fan_in) -> (K, B, fan_out)."""

    def __init__(self, k: int, fan_in: int, fan_out: int, scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, fan_in, fan_out) * scale / math.sqrt(fan_in))
        self.bias = nn.Parameter(torch.zeros(k, 1, fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def noise_fed_layers(k: int, noise_dim: int, hidden: int, out_dim: int, layers: int) -> nn.ModuleList:
    """MESA's generator body for k classes at once: each layer also takes its own chunk of the
    noise; a small last layer starts every trigger close to its class's centre."""
    chunk = noise_dim // layers
    widths = [0] + [hidden] * (layers - 1)
    return nn.ModuleList(
        BatchedLinear(k, widths[i] + chunk, hidden if i < layers - 1 else out_dim,
                      scale=1.0 if i < layers - 1 else 0.1)
        for i in range(layers)
    )


def run_noise_fed(layers: nn.ModuleList, z: torch.Tensor) -> torch.Tensor:
    """z (k, B, noise_dim) through ``noise_fed_layers``: (k, B, out_dim)."""
    chunk = z.shape[-1] // len(layers)
    h = None
    for i, layer in enumerate(layers):
        part = z[..., i * chunk:(i + 1) * chunk]
        h = layer(part if h is None else torch.cat([h, part], -1))
        if i < len(layers) - 1:
            h = F.leaky_relu(h, 0.2)
    return h


class TriggerGenerator(nn.Module):
    """The paper's generator for one class: raw trigger parameters = base + MLP(z), where base is
    the search's trigger and the MLP (the noise cut into one chunk per layer, as in MESA) spreads
    triggers around it. The first ``fixed`` outputs are base alone (the blend factor)."""

    def __init__(self, base: torch.Tensor, noise_dim: int, hidden: int, layers: int = 3, fixed: int = 0):
        super().__init__()
        out_dim = base.numel()
        self.noise_dim, self.fixed = noise_dim, fixed
        self.base = nn.Parameter(base.detach().clone().view(1, 1, out_dim))
        self.layers = noise_fed_layers(1, noise_dim, hidden, out_dim - fixed, layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (1, B, noise_dim) -> raw trigger parameters (1, B, out_dim)."""
        return F.pad(run_noise_fed(self.layers, z), (self.fixed, 0)) + self.base

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(1, n, self.noise_dim, generator=generator).to(self.base.device)


class StatisticsNetwork(nn.Module):
    """MINE's T(z, t)."""

    def __init__(self, noise_dim: int, trigger_dim: int, hidden: int = 128):
        super().__init__()
        self.fc1 = BatchedLinear(1, noise_dim + trigger_dim, hidden)
        self.fc2 = BatchedLinear(1, hidden, 1)

    def forward(self, z: torch.Tensor, t: torch.Tensor):
        return self.fc2(F.elu(self.fc1(torch.cat([z, t], -1)))).squeeze(-1)


class MutualInformation:
    """Donsker-Varadhan estimate of I(z; t), with MINE's moving-average bias correction."""

    def __init__(self, statistics: StatisticsNetwork, rate: float = 0.01):
        self.statistics, self.rate = statistics, rate
        self.moving_exp: torch.Tensor | None = None

    def estimate(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Lower bound on I(z; t) per row of (K, B, ...), differentiable in t: (K,)."""
        shuffled = z[:, torch.randperm(z.shape[1], device=z.device)]
        joint = self.statistics(z, t).mean(1)
        marginal = torch.logsumexp(self.statistics(shuffled, t), 1) - math.log(z.shape[1])
        return joint - marginal

    def statistics_loss(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Trains T to tighten the bound; the moving average of E[e^T] in the denominator
        removes the bias of the plain minibatch gradient."""
        t = t.detach()
        shuffled = z[:, torch.randperm(z.shape[1], device=z.device)]
        joint = self.statistics(z, t).mean(1)
        exp_marginal = self.statistics(shuffled, t).exp().mean(1)
        if self.moving_exp is None:
            self.moving_exp = torch.ones_like(exp_marginal)
        self.moving_exp = (1 - self.rate) * self.moving_exp + self.rate * exp_marginal.detach()
        return -(joint - exp_marginal / self.moving_exp).sum()


@dataclass
class RecoveredTrigger:
    """A flagged class's generator: what unlearning stamps, and what the report pictures."""

    target: int
    family: Family
    generator: TriggerGenerator
    size: float  # of the search's trigger
    asr: float  # held-out ASR of the generator's triggers

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.generator(self.generator.noise(n, generator))[0]

    def stamp(self, x: torch.Tensor, raw: torch.Tensor | None = None) -> torch.Tensor:
        return self.family.stamp(x, self.sample(len(x)) if raw is None else raw)


def train_generator(model, found: FoundTrigger, x: torch.Tensor, y: torch.Tensor,
                    cfg: RecoveryConfig, seed: int) -> TriggerGenerator:
    """The paper's max-entropy generator for one class, started at the search's trigger:

        L_G = -mean(min(log p_c(x (+) G(z)), log beta)) + lambda * relu(size(G(z)) - s) - alpha I(z; G(z))

    The hinge stops pushing once a trigger is good enough, and triggers may not grow beyond the
    size s of the search's trigger, so MINE spreads the generator over many triggers of that size.
    (s on the search's scale: ``found.size`` is detection's held-out budget, another measure.)"""
    torch.manual_seed(seed)
    start_size = found.family.size(found.raw.view(1, -1)).detach()
    fixed = 1 if found.family.name == "blend" else 0  # one blend factor per class, not per z
    generator = TriggerGenerator(found.raw, cfg.noise_dim, cfg.hidden, fixed=fixed).to(x.device)
    mine = MutualInformation(StatisticsNetwork(cfg.noise_dim, found.family.dim).to(x.device))
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.generator_lr, betas=(0.5, 0.999))
    opt_t = torch.optim.Adam(mine.statistics.parameters(), lr=2e-4, betas=(0.5, 0.999))
    g = torch.Generator().manual_seed(seed)
    for _ in range(cfg.generator_steps):
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g).to(x.device)
        z = generator.noise(cfg.batch_size, g)
        t = generator(z)
        logits = model(found.family.stamp(x[idx], t[0])).unsqueeze(0)
        others = (y[idx] != found.target).float()
        log_p = logits.log_softmax(-1)[0, :, found.target]
        hinge = (log_p.clamp(max=math.log(cfg.hinge)) * others).sum() / others.sum().clamp(min=1)
        growth = F.relu(found.family.size(t[0]) - start_size).mean()
        loss = -hinge + 10 * growth - cfg.mi_weight * mine.estimate(z, t).sum()
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        opt_t.zero_grad()
        mine.statistics_loss(z, t).backward()
        opt_t.step()
    return generator.eval()
