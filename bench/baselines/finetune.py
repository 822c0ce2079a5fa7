"""FT: fine-tune the suspect model on the defender's clean set, nothing else.

The plainest baseline: it erases a backdoor only as far as ordinary training on clean data
happens to overwrite it. BackdoorBench's settings (config/defense/ft/config.yaml) except the
epochs, which are scaled down for the CPU (see common.FINE_TUNE_EPOCHS).
"""

import torch
from torch import nn

from .common import FINE_TUNE_BATCH, FINE_TUNE_EPOCHS, fine_tune, trainable_copy


def defend(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
           seed: int = 0, quick: bool = False) -> tuple[nn.Module, dict]:
    epochs = 1 if quick else FINE_TUNE_EPOCHS
    return fine_tune(trainable_copy(model), x, y, epochs=epochs, batch_size=FINE_TUNE_BATCH, seed=seed), {}
