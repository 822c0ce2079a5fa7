"""Defenses the bench compares. Each module has

    defend(model, x, y, num_classes, *, seed=0, quick=False) -> (a new defended model, findings)

where (x, y) is the defender's clean set and ``quick`` runs every step of the method on tiny
settings (the test suite's path). ``findings`` is what the defense concluded about the model, kept
in the bench's row: BAERASE's verdict, Neural Cleanse's flagged classes; {} for a defense that
concludes nothing (it changes every model it is given). The defense never sees the attack. The
model and the images come on one device (the bench's --device); the defense runs there and
returns its model there."""

import importlib
from collections.abc import Callable

# Bench name -> (label in the table, module). Imported on use: a run of one defense loads one.
DEFENSES: dict[str, tuple[str, str]] = {
    "ft": ("FT", "finetune"),
    "fp": ("FP", "fine_pruning"),
    "nc": ("NC", "neural_cleanse"),
    "i-bau": ("i-BAU", "ibau"),
    "anp": ("ANP", "anp"),
    "baerase-paper": ("BAERASE-paper", "baerase_paper"),
    "baerase": ("BAERASE", "baerase"),
}


def get_defense(name: str) -> Callable:
    if name not in DEFENSES:
        raise KeyError(f"unknown defense {name!r}; known: {', '.join(DEFENSES)}")
    return importlib.import_module(f"{__name__}.{DEFENSES[name][1]}").defend
