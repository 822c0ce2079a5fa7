"""What the bench measures: clean accuracy, attack success, robust accuracy, DER, cost, and the
attack success that comes back when the defended model is re-tuned."""

import time

import torch
import torch.nn.functional as F

# Re-tuning as the engine's re-tuning check does it (one implementation, explained below).
from worker.sanitize.retuning import fine_tuned, poison_count
# Clean accuracy the way the engine measures it for its report (one implementation).
from worker.sanitize.unlearning import accuracy


# Re-tuning ("superficial safety", NeurIPS 2024: most defenses that reach a low ASR leave the
# backdoor one short fine-tuning away): a copy of the defended model is fine-tuned for one epoch
# on the defender's clean set plus a few poisoned images, as a user adapting it to their data
# might do with data that holds a little poison. A removed backdoor stays low; a hidden one
# comes back. The optimiser is plain SGD at a constant lr 0.01 with momentum 0.9, the settings
# of the fine-tuning every FT-style defense here ends with (BackdoorBench's), so the re-tuning is
# no harsher per step than those defenses' own, and without a schedule, as a quick user re-tune.
# The poisoned images are 1% of the defender's set, at least one.


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


def clock(device: torch.device) -> float:
    """perf_counter once the device has finished the work queued on it: CUDA runs kernels
    asynchronously, and a clock read without waiting would time their launch only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def clean_epoch_seconds(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128) -> float:
    """Wall time of one forward+backward pass of the model over the clean set: the unit of the
    table's cost column, measured in the same run (and on the same device) as the defense it divides."""
    model.eval()
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    started = clock(x.device)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        F.cross_entropy(model(xb), yb).backward()
    elapsed = clock(x.device) - started
    for p, flag in zip(params, flags):
        p.grad = None
        p.requires_grad_(flag)
    return elapsed


def retuning_set(attack, x: torch.Tensor, y: torch.Tensor,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The defender's clean set (x, y) plus ``poison_count`` poisoned copies of its
    images: images of classes other than the trigger's target, stamped with the trigger and
    labelled with the target. Several triggers share the poisoned images evenly."""
    g = torch.Generator().manual_seed(seed)
    triggers = attack.triggers()
    xs, ys = [x], [y]
    shares = torch.arange(poison_count(len(x))).tensor_split(len(triggers))
    for share, (stamp, target) in zip(shares, triggers):
        others = (y != target).nonzero().squeeze(1)
        chosen = others[torch.randperm(len(others), generator=g)[: len(share)]]
        xs.append(stamp(x[chosen]))
        ys.append(torch.full_like(y[chosen], target))
    return torch.cat(xs), torch.cat(ys)


def retuned(model, attack, defender: tuple[torch.Tensor, torch.Tensor],
            test: tuple[torch.Tensor, torch.Tensor], seed: int = 0) -> dict:
    """CA and ASR on the test set of a copy of ``model`` re-tuned on ``retuning_set`` (the model
    itself is left as it was); None for a clean model, which has no trigger to bring back."""
    if attack is None:
        return {"ca_retuned": None, "asr_retuned": None}
    x, y = retuning_set(attack, *defender, seed=seed)
    after = evaluate(fine_tuned(model, x, y, torch.Generator().manual_seed(seed)), attack, *test)
    return {"ca_retuned": after["ca"], "asr_retuned": after["asr"]}
