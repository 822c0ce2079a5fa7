"""What the bench measures: clean accuracy, attack success, robust accuracy, DER and cost."""

import time

import torch
import torch.nn.functional as F

# Clean accuracy the way the engine measures it for its report (one implementation).
from worker.sanitize.unlearning import accuracy


@torch.no_grad()
def predict(model, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(xb).argmax(1) for xb in x.split(batch_size)])


def backdoor_rates(model, attack, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(ASR, RA) averaged over the attack's triggers: the share of triggered test images whose
    true class is not the target that the model puts in the target class, and in their true class."""
    asr, ra = [], []
    for stamp, target in attack.triggers():
        keep = y != target
        predicted = predict(model, stamp(x[keep]))
        asr.append((predicted == target).float().mean().item())
        ra.append((predicted == y[keep]).float().mean().item())
    return sum(asr) / len(asr), sum(ra) / len(ra)


def evaluate(model, attack, x: torch.Tensor, y: torch.Tensor) -> dict:
    """CA, and for a backdoored model ASR and RA (None for a clean model: there is no trigger)."""
    ca = accuracy(model, x, y)
    asr, ra = backdoor_rates(model, attack, x, y) if attack is not None else (None, None)
    return {"ca": ca, "asr": asr, "ra": ra}


def defense_effectiveness_rating(before: dict, after: dict) -> float | None:
    """BackdoorBench's DER = [max(0, dASR) - max(0, dCA) + 1] / 2, in [0, 1]."""
    if before["asr"] is None:
        return None
    return (max(0.0, before["asr"] - after["asr"]) - max(0.0, before["ca"] - after["ca"]) + 1) / 2


def clean_epoch_seconds(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128) -> float:
    """Wall time of one forward+backward pass of the model over the clean set: the unit of the
    table's cost column, measured in the same run as the defense it divides."""
    model.eval()
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    started = time.perf_counter()
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        F.cross_entropy(model(xb), yb).backward()
    elapsed = time.perf_counter() - started
    for p, flag in zip(params, flags):
        p.grad = None
        p.requires_grad_(flag)
    return elapsed
