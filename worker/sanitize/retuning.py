"""The re-tuning check: is an unlearnt backdoor gone, or only dormant?

Unlearning can remove a backdoor's surface: the recovered trigger stops working, and a search
from scratch finds nothing small, while the features that carried the backdoor stay. A brief
fine-tuning with a handful of triggered images then brings it back: a Fashion-MNIST BadNets model
reported `removed` kept 12.9% of its true trigger and re-tuned to 78% (docs/population.md, ninth
sitting). A class that truly lost its backdoor learns the trigger again no faster than a model
that never had one.

So each unlearnt class's found trigger is taught, for one epoch, to a copy of the sanitized model
and to a copy of the reference model (reference.py), on the training split plus 1% of it stamped
with the trigger and labelled with the class; the statistic is how much more often the trigger
works on held-out images after that on the sanitized copy than on the reference's, in log odds.
The calibration's clean models, each unlearnt as if its most suspicious classes were targets, set
the line (bench/population.py, ``--calibrate``), one per model kind: fine-tuning in training mode
moves BatchNorm's running statistics as well as the weights, and clean models that keep them
learned their unlearnt classes back far faster than plain ones (statistics -0.1 to +6.1 against
-7.1 to -2.7, docs/population.md), so a line pooled over both let dormant backdoors of plain models
through.
"""

import copy
import math
from dataclasses import dataclass

import torch

from .recovery import FoundTrigger, held_out_asr
from .reference import train_epochs

# The bench's re-tuning of the true trigger uses the same settings (bench/metrics.py says why these).
POISON_SHARE = 0.01  # triggered images, as a share of the clean images (at least one)
EPOCHS, LR, MOMENTUM, BATCH_SIZE = 1, 0.01, 0.9, 128


KINDS = ("batchnorm", "plain", "dense")


def model_kind(model) -> str:
    """"batchnorm" for a model that keeps running statistics (BatchNorm and the like), else "plain"
    for one with convolutions (a weight of three or more dimensions), else "dense": fully connected
    layers only. A dense model's ordinary classes need far smaller triggers than a convolutional
    one's: the plain models' fit put two clean perceptrons above the suspicious line, and unlearnt
    one (docs/population.md, twenty-third sitting)."""
    if any(name.endswith("running_mean") for name, _ in model.named_buffers()):
        return "batchnorm"
    return "plain" if any(p.dim() >= 3 for p in model.parameters()) else "dense"


@dataclass
class Retuning:
    target: int
    family: str
    asr: float  # the found trigger's held-out ASR on the sanitized model, as it is
    retuned_asr: float  # ... on the sanitized model's re-tuned copy
    reference_asr: float  # ... on the reference model's re-tuned copy
    statistic: float  # log odds of retuned_asr minus those of reference_asr
    kind: str  # the model's kind (KINDS): which clean models' line judges the statistic


def poison_count(clean_images: int) -> int:
    return max(1, round(POISON_SHARE * clean_images))


def retuned_asr(model, trigger: FoundTrigger, x: torch.Tensor, y: torch.Tensor, x_hold: torch.Tensor,
                y_hold: torch.Tensor, seed: int) -> float:
    """The trigger's held-out ASR on a copy of ``model`` fine-tuned on (x, y) plus ``POISON_SHARE``
    of it stamped with the trigger; ``model`` is left as it was."""
    g = torch.Generator().manual_seed(seed)
    others = (y != trigger.target).nonzero().squeeze(1).cpu()
    chosen = others[torch.randperm(len(others), generator=g)[: poison_count(len(x))]].to(x.device)
    stamped = trigger.family.stamp(x[chosen], trigger.raw.view(1, -1).expand(len(chosen), -1))
    xs, ys = torch.cat([x, stamped]), torch.cat([y, torch.full_like(y[chosen], trigger.target)])
    return held_out_asr(fine_tuned(model, xs, ys, g), trigger, x_hold, y_hold)


def fine_tuned(model, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.nn.Module:
    """A copy of ``model`` re-tuned on (x, y): SGD on all layers in training mode, ``EPOCHS`` in an
    order ``generator`` shuffles; returned in eval mode, ``model`` left as it was."""
    with torch.no_grad():  # a TorchScript module's copy would otherwise hold non-leaf clones
        tuned = copy.deepcopy(model)
    params = [p for p in tuned.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    train_epochs(tuned, torch.optim.SGD(params, lr=LR, momentum=MOMENTUM), x, y, EPOCHS, BATCH_SIZE, generator)
    return tuned


def log_odds(share: float, images: int) -> float:
    """Log odds of a share of ``images``, half an image from 0 and 1 so that none is infinite."""
    hits = share * images
    return math.log((hits + 0.5) / (images - hits + 0.5))


def retune(model, reference, trigger: FoundTrigger, x, y, x_hold, y_hold, seed: int) -> Retuning:
    """The re-tuning check of one found trigger on the (sanitized) model against the reference."""
    images = int((y_hold != trigger.target).sum())
    on_model = retuned_asr(model, trigger, x, y, x_hold, y_hold, seed)
    on_reference = retuned_asr(reference, trigger, x, y, x_hold, y_hold, seed)
    return Retuning(trigger.target, trigger.family.name, held_out_asr(model, trigger, x_hold, y_hold), on_model,
                    on_reference, log_odds(on_model, images) - log_odds(on_reference, images), model_kind(model))
