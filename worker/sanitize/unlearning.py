"""Unlearning: fine-tune the model so the recovered triggers lose their effect while clean
accuracy stays.

The original model is the teacher: on clean images it is what we want to keep (a backdoor does
not fire on them), and the class it gives a clean image is the class that image should keep when
a trigger is stamped on it. Each step draws fresh triggers from every flagged class's generator,
stamps them on a clean batch and minimises

    H(f0(x), f(x)) + H(f0(x), f(x (+) t)) + mean over y != c of max(0, log p_c(x (+) t) - log(1/K))
        + lambda * ||theta - theta0||_1

with H the cross-entropy against the teacher's soft prediction mixed with the true label. Soft
targets from the teacher keep far more of the original function than hard labels of a few
thousand images, which the model would otherwise overfit. The second term sends triggered images
back to their true class (robust accuracy, no "trigger shifting" to a third class). The third is
the paper's ascent away from the target, bounded: it stops pushing once the target is no likelier
than chance, so it cannot grow without limit and wreck clean accuracy. The model stays in eval
mode, so BatchNorm statistics stay frozen.

The triggers are a moving target: before every check their generators train again for a few
steps against the current model (their size capped near what recovery found), so a backdoor that
survives in a slightly different form is found and unlearnt too, and the ASR a check measures is
that of the strongest trigger of that size, not of yesterday's.

Stopping uses no oracle: at every check the held-out split gives clean accuracy and the recovered
triggers' ASR. Among checkpoints whose recovered ASR is under the threshold, the one with the best
held-out accuracy wins; stopping the moment the ASR first dips is too early, since accuracy comes
back with further joint steps. A non-finite loss or held-out accuracy at chance level rolls back to
the last good weights and halves the step size: a model with NaN weights is never returned.
"""

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import RecoveryConfig, UnlearningConfig
from .recovery import RecoveredTrigger, TriggerTrainer

MAX_ROLLBACKS = 8  # after this many, the best checkpoint so far is returned


@dataclass
class Check:
    step: int
    clean_accuracy: float
    recovered_asr: dict[int, float]

    @property
    def worst_asr(self) -> float:
        return max(self.recovered_asr.values(), default=0.0)


@dataclass
class UnlearningResult:
    before: Check
    after: Check
    steps: int
    epochs: float
    rollbacks: int
    history: list[Check] = field(default_factory=list)


@torch.no_grad()
def evaluate(model, triggers: list[RecoveredTrigger], x, y, step: int, batch_size: int = 500,
             seed: int = 0) -> Check:
    """Held-out clean accuracy and each trigger's ASR on the held-out non-target images. The
    triggers come from a fixed noise seed so checks compare like with like."""
    model.eval()
    correct = sum((model(xb).argmax(1) == yb).sum().item()
                  for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    asr = {}
    for trigger in triggers:
        others = x[y != trigger.target]
        noise = torch.Generator().manual_seed(seed)
        hits = sum((model(trigger.stamp(xb, trigger.sample(len(xb), noise))).argmax(1)
                    == trigger.target).sum().item() for xb in others.split(batch_size))
        asr[trigger.target] = hits / max(1, len(others))
    return Check(step, correct / max(1, len(y)), asr)


def unlearning_loss(model, triggers: list[RecoveredTrigger], x, y, teacher_probs: torch.Tensor,
                    num_classes: int, anchor: list[torch.Tensor], l1_weight: float) -> torch.Tensor:
    """``teacher_probs``: the soft targets for x (the original model's prediction mixed with the
    true label)."""
    loss = soft_cross_entropy(model(x), teacher_probs)
    chance = math.log(1 / num_classes)
    # Each trigger gets its share of the batch, so a step costs the same for any number of targets.
    for trigger, part in zip(triggers, torch.arange(len(x)).tensor_split(max(1, len(triggers)))):
        xs, ys = x[part], y[part]
        logits = model(augmented_stamp(trigger, xs))
        loss = loss + soft_cross_entropy(logits, teacher_probs[part]) * len(part) / len(x)
        others = ys != trigger.target
        if others.any():
            log_p_target = logits[others].log_softmax(1)[:, trigger.target]
            loss = loss + F.relu(log_p_target - chance).sum() / len(x)
    if l1_weight:
        params = [p for p in model.parameters() if p.requires_grad]
        loss = loss + l1_weight * sum((p - p0).abs().sum() for p, p0 in zip(params, anchor))
    return loss


def augmented_stamp(trigger: RecoveredTrigger, x: torch.Tensor) -> torch.Tensor:
    """Stamps triggers whose masks are randomly grown by a pixel and shifted by up to a pixel.

    Recovery finds a trigger that works, rarely the exact one the attacker used: a recovered
    BadNets square, say, is a scattering of its pixels. Unlearning only those pixels leaves the
    rest of the true trigger working; the jitter covers its neighbourhood.
    """
    t = trigger.sample(len(x))
    parts = trigger.family.split(t)
    if "mask" not in parts:  # a patch already lands at random positions
        return trigger.family.stamp(x, t)
    mask, pattern = parts["mask"], parts["pattern"]
    # A blend factor (a 1 x 1 mask) does not grow; its full-image pattern shifts like any other.
    grow = torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5
    mask = torch.where(grow, F.max_pool2d(mask, 3, stride=1, padding=1), mask)
    dy, dx = torch.randint(-1, 2, (2,)).tolist()
    mask = torch.roll(mask, (dy, dx), dims=(2, 3))
    pattern = torch.roll(pattern, (dy, dx), dims=(2, 3))
    return x + mask * (pattern - x)


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    return -(target_probs * logits.log_softmax(1)).sum(1).mean()


@torch.no_grad()
def soft_targets(teacher, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Half the teacher's prediction, half the true label: the label corrects the teacher where it
    is wrong, the teacher keeps what it knows about similar classes."""
    return 0.5 * teacher(x).softmax(1) + 0.5 * F.one_hot(y, num_classes).float()


def refresh(model, trainers: list[TriggerTrainer], triggers: list[RecoveredTrigger], x, y,
            steps: int, batch_size: int, batches: torch.Generator) -> None:
    """Re-fit each trigger generator to the current model for a few steps."""
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for trainer, trigger in zip(trainers, triggers):
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch_size,), generator=batches).to(x.device)
            trainer.step(model, x[idx], y[idx], [0], [trigger.target])
    for p, r in zip(model.parameters(), requires):
        p.requires_grad_(r)


def unlearn(model, triggers: list[RecoveredTrigger], x_train, y_train, x_hold, y_hold,
            num_classes: int, cfg: UnlearningConfig, recovery: RecoveryConfig, seed: int = 0,
            on_step=None, check_cancel=None) -> UnlearningResult:
    model.eval()  # frozen BatchNorm statistics, no dropout
    # Refreshing trains the generators further: work on copies, the recovered ones stay as found.
    triggers = [dataclasses.replace(t, family=t.family.capped(cfg.size_slack * t.size),
                                    generator=copy.deepcopy(t.generator)) for t in triggers]
    trainers = [TriggerTrainer(t.generator, t.family, recovery, t.penalty) for t in triggers]
    params = [p for p in model.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    anchor = [p.detach().clone() for p in params]
    teacher = copy.deepcopy(model)
    lr = cfg.lr
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    batches = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, math.ceil(len(x_train) / cfg.batch_size))
    check_every = max(1, steps_per_epoch // cfg.checks_per_epoch)
    total_steps = cfg.max_epochs * steps_per_epoch

    def batch_indices():
        while True:
            yield from torch.randperm(len(x_train), generator=batches).split(cfg.batch_size)

    before = evaluate(model, triggers, x_hold, y_hold, 0, seed=seed)
    history = [before]
    good_state = copy.deepcopy(model.state_dict())  # the last state that passed a check
    best: tuple[Check, dict] | None = None  # best checkpoint under the ASR threshold
    fallback = (before, good_state)  # lowest recovered ASR so far, should none get under it
    rollbacks, since_best, step = 0, 0, 0

    for idx in batch_indices():
        if step >= total_steps or rollbacks > MAX_ROLLBACKS:
            break
        if check_cancel:
            check_cancel()
        x, y = x_train[idx], y_train[idx]
        loss = unlearning_loss(model, triggers, x, y, soft_targets(teacher, x, y, num_classes),
                               num_classes, anchor, cfg.l1_anchor)
        healthy = bool(torch.isfinite(loss))
        if healthy:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if on_step:
                on_step(step, total_steps)
            if step % check_every and step != total_steps:
                continue
            refresh(model, trainers, triggers, x_train, y_train, cfg.refresh_steps,
                    recovery.batch_size * 2, batches)
            check = evaluate(model, triggers, x_hold, y_hold, step, seed=seed)
            # Accuracy dips for an epoch or two while the backdoor goes, then comes back; only a
            # fall to chance level means the run diverged.
            healthy = (all(torch.isfinite(p).all() for p in params)
                       and check.clean_accuracy > 2 / num_classes)
        if not healthy:  # roll back to the last good weights and halve the step size
            rollbacks, lr = rollbacks + 1, lr / 2
            model.load_state_dict(good_state)
            optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
            continue

        history.append(check)
        good_state = copy.deepcopy(model.state_dict())
        if (check.worst_asr, -check.clean_accuracy) < (fallback[0].worst_asr, -fallback[0].clean_accuracy):
            fallback = (check, good_state)
        if check.worst_asr <= cfg.asr_threshold and (
                best is None or check.clean_accuracy > best[0].clean_accuracy):
            best, since_best = (check, good_state), 0
        elif best is not None:
            since_best += 1
            # A checkpoint that erased the backdoor by wrecking accuracy is no reason to stop:
            # accuracy comes back with further joint steps, so go on while the best is poor.
            good_enough = best[0].clean_accuracy >= before.clean_accuracy - cfg.accuracy_tolerance
            if since_best >= cfg.patience and good_enough:
                break

    chosen, state = best or fallback
    model.load_state_dict(state)
    for p in params:
        p.requires_grad_(False)
    return UnlearningResult(before, chosen, chosen.step, chosen.step / steps_per_epoch,
                            rollbacks, history)
