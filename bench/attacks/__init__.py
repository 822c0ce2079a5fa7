"""Backdoor attacks: each poisons a training set and stamps its trigger on test images.

An attack is evaluation-side knowledge only: the defense never sees it (no oracle).
"""

from .base import Attack
from .badnets import BadNets
from .blended import Blended
from .multi import Checkerboard, MultiTrigger
from .sig import SIG
from .trojan import TrojanNN
from .wanet import WaNet

ATTACKS = {"badnets": BadNets, "blended": Blended, "trojan": TrojanNN, "sig": SIG,
           "wanet": WaNet, "multi": MultiTrigger}

__all__ = ["ATTACKS", "Attack", "BadNets", "Blended", "Checkerboard", "MultiTrigger", "SIG", "TrojanNN", "WaNet"]
