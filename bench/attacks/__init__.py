"""Backdoor attacks: each poisons a training set and stamps its trigger on test images.

An attack is evaluation-side knowledge only: the defense never sees it (no oracle).
"""

from .base import Attack
from .badnets import BadNets
from .blended import Blended
from .trojan import TrojanWatermark

ATTACKS = {"badnets": BadNets, "blended": Blended, "trojan": TrojanWatermark}

__all__ = ["ATTACKS", "Attack", "BadNets", "Blended", "TrojanWatermark"]
