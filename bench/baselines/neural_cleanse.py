"""NC: Neural Cleanse (Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao, IEEE S&P 2019).

For every class c, NC reverse-engineers the smallest trigger that sends clean images to c: a mask
m (H x W) and a pattern p (C x H x W), stamped as (1 - m) * x + m * p, minimising
CE(f(stamped), c) + cost * |m|_1, where the cost rises while the trigger works and falls while it
does not. A backdoor's target needs a far smaller mask than the other classes, so classes whose
mask norm lies far below the median (MAD anomaly index > 2) are flagged. If any is, the model is
fine-tuned on the clean set with the flagged triggers stamped on a fifth of the images, which keep
their true labels: the model unlearns the trigger. If none is, the model is returned unchanged.

Settings: BackdoorBench (defense/nc.py, config/defense/nc/cifar10.yaml): Adam lr 0.1 betas
(0.5, 0.9), init_cost 1e-3, cost x2 after 5 successful epochs and /2**1.5 after 5 failing ones
(as in NC's own code, bolunwang/backdoor), success at 98% attack success, early stop after 25
epochs without a 1% better norm once the cost has moved both ways, unlearning_ratio 0.2, then
its usual fine-tuning. Scaled down for the CPU:
- all classes are searched together, one forward pass of K x batch images per step;
- an "epoch" of the cost schedule is 10 steps of 32 images per class (NC: ~31 steps of 32,
  BackdoorBench: a pass over the clean set in batches of 256), and the search stops after 40
  (BackdoorBench: 80 passes), i.e. at most 400 steps per class;
- the fine-tuning epochs (see common.FINE_TUNE_EPOCHS).
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import FINE_TUNE_BATCH, FINE_TUNE_EPOCHS, fine_tune, trainable_copy


@dataclass(frozen=True)
class Settings:
    lr: float = 0.1
    init_cost: float = 1e-3
    cost_up: float = 2.0
    cost_down: float = 2.0 ** 1.5
    success: float = 0.98          # attack success that counts as a working trigger
    patience: int = 5              # epochs of success (failure) before the cost goes up (down)
    early_stop_patience: int = 25
    early_stop_threshold: float = 0.99
    batch_size: int = 32           # clean images per class and step
    epoch_steps: int = 10
    epochs: int = 40
    anomaly_threshold: float = 2.0
    unlearning_ratio: float = 0.2
    fine_tune_epochs: int = FINE_TUNE_EPOCHS


QUICK = Settings(batch_size=8, epoch_steps=2, epochs=3, fine_tune_epochs=1)


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return (1 - mask) * x + mask * pattern


def to_unit(v: torch.Tensor) -> torch.Tensor:
    """NC's parametrisation: unconstrained values mapped into (0, 1) for Adam to optimise."""
    return torch.tanh(v) / 2 + 0.5


class CostSchedule:
    """NC's dynamic cost, one per class, and the best (smallest working) trigger of each class.
    Fed once per epoch with each class's mean attack success and mask norm over the epoch; kept
    on the device the trigger search runs on."""

    def __init__(self, num_classes: int, settings: Settings, device: torch.device | str = "cpu"):
        self.s = settings
        k = num_classes
        self.cost = torch.full((k,), settings.init_cost, device=device)
        self.successes = torch.zeros(k, dtype=torch.long, device=device)  # consecutive epochs
        self.failures = torch.zeros(k, dtype=torch.long, device=device)
        self.raised = torch.zeros(k, dtype=torch.bool, device=device)
        self.lowered = torch.zeros(k, dtype=torch.bool, device=device)
        self.best_norm = torch.full((k,), float("inf"), device=device)
        self.best_mask: torch.Tensor | None = None
        self.best_pattern: torch.Tensor | None = None
        self.stale = torch.zeros(k, dtype=torch.long, device=device)  # epochs without a 1% better norm
        self.stale_norm = torch.full((k,), float("inf"), device=device)
        self.stopped = torch.zeros(k, dtype=torch.bool, device=device)

    def update(self, asr: torch.Tensor, norm: torch.Tensor, mask: torch.Tensor,
               pattern: torch.Tensor) -> None:
        s, works = self.s, asr >= self.s.success
        if self.best_mask is None:
            # A class whose trigger never works keeps its first mask: a large norm, never flagged.
            self.best_mask, self.best_pattern = mask.clone(), pattern.clone()
        better = works & (norm < self.best_norm) & ~self.stopped
        self.best_norm = torch.where(better, norm, self.best_norm)
        self.best_mask[better] = mask[better]
        self.best_pattern[better] = pattern[better]

        improved = self.best_norm < s.early_stop_threshold * self.stale_norm
        self.stale = torch.where(improved, 0, self.stale + 1)
        self.stale_norm = torch.minimum(self.stale_norm, self.best_norm)
        self.stopped |= self.raised & self.lowered & (self.stale >= s.early_stop_patience)

        self.successes = torch.where(works, self.successes + 1, 0)
        self.failures = torch.where(works, 0, self.failures + 1)
        up, down = self.successes >= s.patience, self.failures >= s.patience
        self.cost = torch.where(up, self.cost * s.cost_up, torch.where(down, self.cost / s.cost_down, self.cost))
        self.successes[up] = 0
        self.failures[down] = 0
        self.raised |= up
        self.lowered |= down


def reverse_engineer(model: nn.Module, x: torch.Tensor, num_classes: int, settings: Settings,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's smallest working trigger: masks (K, 1, H, W) and patterns (K, C, H, W)."""
    with torch.no_grad():
        model = copy.deepcopy(model).eval()  # BatchNorm statistics stay fixed
    for p in model.parameters():  # one by one: a TorchScript module has no requires_grad_()
        p.requires_grad_(False)
    k, b, (c, h, w) = num_classes, settings.batch_size, x.shape[1:]
    # BackdoorBench starts every class from a near-full mask (tanh(1)/2 + 0.5 = 0.88), which
    # already flips most images; the cost then shrinks it.
    mask_v = torch.ones(k, 1, h, w, device=x.device, requires_grad=True)
    pattern_v = torch.ones(k, c, h, w, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([mask_v, pattern_v], lr=settings.lr, betas=(0.5, 0.9))
    schedule = CostSchedule(k, settings, x.device)
    targets = torch.arange(k, device=x.device).repeat_interleave(b)
    g = torch.Generator().manual_seed(seed)
    for _ in range(settings.epochs):
        asr, norm = torch.zeros(k, device=x.device), torch.zeros(k, device=x.device)
        for _ in range(settings.epoch_steps):
            xb = x[torch.randint(len(x), (b,), generator=g)]
            mask, pattern = to_unit(mask_v), to_unit(pattern_v)
            # Every class's trigger on the same images, (K, B, C, H, W), in one forward pass.
            logits = model(stamp(xb[None], mask[:, None], pattern[:, None]).flatten(0, 1))
            ce = F.cross_entropy(logits, targets, reduction="none").view(k, b).mean(1)
            l1 = mask.flatten(1).sum(1)
            opt.zero_grad()
            (ce + schedule.cost * l1).sum().backward()  # classes share no parameter
            opt.step()
            asr += (logits.argmax(1) == targets).view(k, b).float().mean(1) / settings.epoch_steps
            norm += l1.detach() / settings.epoch_steps
        with torch.no_grad():
            schedule.update(asr, norm, to_unit(mask_v), to_unit(pattern_v))
        if schedule.stopped.all():
            break
    return schedule.best_mask, schedule.best_pattern


def anomaly_indices(norms: torch.Tensor) -> torch.Tensor:
    """Distance to the median in units of the median absolute deviation; the constant 1.4826
    makes the MAD estimate a standard deviation for normal data. quantile(0.5) is NC's np.median
    (the mean of the two middle values; torch.median would take the lower one)."""
    median = norms.quantile(0.5)
    mad = 1.4826 * (norms - median).abs().quantile(0.5)
    return (norms - median).abs() / mad


def largest_anomaly_index(norms: torch.Tensor) -> float:
    """The model's score in Neural Cleanse's detection: the largest anomaly index of a class
    below the median (0 when none is)."""
    below = norms < norms.quantile(0.5)
    return max((i for i, low in zip(anomaly_indices(norms).tolist(), below.tolist()) if low), default=0.0)


def flag(norms: torch.Tensor, threshold: float = 2.0) -> list[int]:
    """Classes whose trigger is anomalously SMALL, smallest first. An unusually large mask says
    nothing about a backdoor, so classes above the median are never flagged."""
    below, index = norms < norms.quantile(0.5), anomaly_indices(norms)
    return [c for c in norms.argsort().tolist() if below[c] and index[c] > threshold]


def unlearning_set(x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor,
                   flagged: list[int], ratio: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """BackdoorBench's unlearning data: a random ``ratio`` of the clean images is replaced by
    copies carrying each flagged class's reversed trigger, labelled with their TRUE class."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    chosen, rest = order[: int(ratio * len(x))], order[int(ratio * len(x)):]
    xs = [x[rest]] + [stamp(x[chosen], masks[c], patterns[c]) for c in flagged]
    ys = [y[rest]] + [y[chosen]] * len(flagged)
    return torch.cat(xs), torch.cat(ys)


def defend(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
           seed: int = 0, quick: bool = False) -> tuple[nn.Module, dict]:
    settings = QUICK if quick else Settings()
    masks, patterns = reverse_engineer(model, x, num_classes, settings, seed)
    norms = masks.flatten(1).sum(1)
    findings = {"flagged": flag(norms, settings.anomaly_threshold), "anomaly_index": largest_anomaly_index(norms)}
    if not findings["flagged"]:
        return copy.deepcopy(model).eval(), findings
    xu, yu = unlearning_set(x, y, masks, patterns, findings["flagged"], settings.unlearning_ratio, seed)
    return fine_tune(trainable_copy(model), xu, yu, epochs=settings.fine_tune_epochs,
                     batch_size=FINE_TUNE_BATCH, seed=seed), findings
