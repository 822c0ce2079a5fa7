"""BAERASE as published: Liu et al., "Backdoor Defense with Machine Unlearning" (INFOCOM 2022),
in its original configuration, so that the bench shows what the service's fixes buy
(docs/method.md; the design note's "Step 1", "Step 2" and "Measured: the paper's configuration").

1. Recovery: for every class c a max-entropy generator of 3x3 patch triggers pasted at a random
   position (the engine's TriggerGenerator, TriggerTrainer and PatchFamily), trained for a fixed
   number of steps: no screening, no early stop, no mask family.
2. Detection: the class whose triggers reach the highest held-out ASR, if MAD calls it an outlier
   (anomaly index > 2), without the service's absolute floors.
3. Unlearning: L = a * CE(f(x), y) - CE(f(x (+) t), c) + lambda * ||theta - theta0||_1 with fresh
   triggers t each batch: an unbounded ascent, SGD, BatchNorm in training mode as in the paper's
   code, for a fixed number of epochs (the paper stops on the TRUE trigger's ASR, an oracle).

Where the engine cannot express the paper, the closest setting is used: the generator is the
engine's MLP without BatchNorm, with a learnt centre (base) that here moves at the MLP's own rate,
so it stays close to a plain MLP; the hinge is min(log p_c, log beta) instead of
min(p_c, beta). Scaled down for the CPU: recovery takes the paper's number of generator steps
(~10 epochs of batches of 128 over 2,400 images: 190 steps) on batches of 32 images per class
(with 64, recovery alone took 3 minutes of one core on the small CNN); everything else is the
paper's.
"""

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from worker.sanitize.config import RecoveryConfig
from worker.sanitize.detection import anomaly_indices
from worker.sanitize.pipeline import stratified_split
from worker.sanitize.recovery import (PatchFamily, RecoveredTrigger, TriggerGenerator,
                                      TriggerTrainer, evaluate_generator)

from .common import trainable_copy

MINE_RATE = 0.001  # the paper's moving-average rate (the engine's default is 0.01)


# The paper's generator settings, as far as the engine's RecoveryConfig expresses them.
PAPER_RECOVERY = RecoveryConfig(families=["patch"], patch_size=3, steps=190, batch_size=32,
                                hidden=512, lr=2e-4, base_lr=2e-4, mi_weight=0.1, hinge=0.5)


@dataclass(frozen=True)
class Settings:
    recovery: RecoveryConfig = field(default_factory=lambda: PAPER_RECOVERY)
    holdout_fraction: float = 0.2  # of the clean set, for the ASRs detection compares
    anomaly_index: float = 2.0
    clean_weight: float = 100.0  # a
    l1_weight: float = 1e-6  # lambda
    lr: float = 1e-4
    epochs: int = 10
    batch_size: int = 128  # assumed the same as the paper's generator batch
    images: int | None = None  # use only the first N clean images (quick runs)


FULL = Settings()
QUICK = Settings(recovery=PAPER_RECOVERY.model_copy(update={"steps": 10, "batch_size": 8}),
                 epochs=1, batch_size=64, images=256)


def recover(model: nn.Module, x_train, y_train, x_hold, y_hold, num_classes: int,
            cfg: RecoveryConfig) -> list[RecoveredTrigger]:
    """One patch-trigger generator per class, all trained for ``cfg.steps`` steps; each is scored
    by its ASR on the held-out split."""
    family = PatchFamily(tuple(x_train.shape[1:]), cfg.patch_size)
    generator = TriggerGenerator(num_classes, cfg.noise_dim, cfg.hidden, family.dim)
    trainer = TriggerTrainer(generator, family, cfg, cfg.mask_penalty)
    trainer.mine.rate = MINE_RATE
    classes = list(range(num_classes))
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(x_train), (cfg.batch_size,))
        trainer.step(model, x_train[idx], y_train[idx], classes, classes)
    return [evaluate_generator(model, family, generator.select([c]), c, 0.0, x_hold, y_hold)
            for c in classes]


def flagged_target(asrs: list[float], threshold: float) -> int | None:
    """The class of highest recovered ASR if MAD calls it an outlier; no absolute floor."""
    indices = anomaly_indices([-a for a in asrs])  # anomaly_indices flags values BELOW the median
    best = max(range(len(asrs)), key=asrs.__getitem__)
    return best if indices[best] > threshold else None


def ascent_loss(model: nn.Module, trigger: RecoveredTrigger, x, y, anchor: list[torch.Tensor],
                s: Settings) -> torch.Tensor:
    clean = F.cross_entropy(model(x), y)
    target = torch.full_like(y, trigger.target)
    triggered = F.cross_entropy(model(trigger.stamp(x)), target)  # fresh triggers every call
    l1 = sum((p - p0).abs().sum() for p, p0 in zip(model.parameters(), anchor))
    return s.clean_weight * clean - triggered + s.l1_weight * l1


def unlearn(model: nn.Module, trigger: RecoveredTrigger, x, y, s: Settings,
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
           quick: bool = False) -> nn.Module:
    s = QUICK if quick else FULL
    x, y = x[:s.images], y[:s.images]
    torch.manual_seed(seed)  # the engine's generators draw noise and positions from the global RNG
    train, hold = stratified_split(y, s.holdout_fraction, seed)
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    triggers = recover(frozen, x[train], y[train], x[hold], y[hold], num_classes, s.recovery)
    target = flagged_target([t.asr for t in triggers], s.anomaly_index)
    if target is None:
        return trainable_copy(model).eval()
    return unlearn(model, triggers[target], x[train], y[train], s,
                   torch.Generator().manual_seed(seed))
