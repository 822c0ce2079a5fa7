"""The engine's development population: backdoored and clean classifiers, calibration and evaluation.

Many models to develop and calibrate the engine on, split once into a calibration part and an
evaluation part.

    baerase bench --suite population --train [--limit N]   # train (and cache) the models
    baerase bench --suite population --calibrate           # fit worker/sanitize/calibration.json
    baerase bench --suite population --calibrate --keep-retuning  # ... the detection's fits alone
    baerase bench --suite population --detect              # detection alone: ROC-AUC on the evaluation models
    baerase bench --suite population --detect --neural-cleanse  # ... and Neural Cleanse's beside it
    baerase bench --suite population --evaluate            # the engine on the evaluation models
    baerase bench --suite population --evaluate --neural-cleanse  # ... and Neural Cleanse's detection beside it

- Backdoored half: BadNets squares of 2-5 px at corner, edge and centre in white, black and random
  colour, Blended (noise and image patterns, alpha 0.1-0.2), a TrojanNN watermark, a checkerboard,
  SIG, WaNet, two- and three-target models, poisoning 1-10%.
- Clean half: the same datasets, architectures and training lengths, seeds 0-7 and 30-36 (CIFAR-10: 0-2).
- Split by seed: clean models with seed 0, 1, 4, 5, 6 or 30-34 are the calibration part (every detection threshold
  is set from them and nothing else); all other models are the evaluation part, on which results
  are reported. Backdoored models never set anything.

Models are trained once and cached (TorchScript, with their clean accuracy and attack success);
engine and Neural Cleanse results are cached per model, so a run resumes where it stopped.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .attacks import BadNets, Blended, MultiTrigger, SIG, TrojanNN, WaNet
from .attacks.multi import Checkerboard
from .datasets import cifar10, fashion_mnist
from .metrics import evaluate
from .train import crop_and_flip, train_classifier

CALIBRATION_SEEDS = (0, 1, 4, 5, 6, 30, 31, 32, 33, 34)  # clean models with these seeds set the thresholds
ATTACKS = {"badnets": BadNets, "blended": Blended, "trojan": TrojanNN, "checkerboard": Checkerboard,
           "sig": SIG, "wanet": WaNet, "multi": MultiTrigger}


@dataclass(frozen=True)
class Victim:
    dataset: str  # fmnist | cifar10
    arch: str
    attack: str | None  # None: a clean model
    seed: int
    epochs: int
    train_size: int | None = None  # None: the whole training pool
    options: dict = field(default_factory=dict, hash=False, compare=False)  # the attack's arguments

    @property
    def key(self) -> str:
        parts = [self.dataset, self.arch, self.attack or "clean"]
        parts += [f"{k}{'_'.join(map(str, v)) if isinstance(v, tuple) else v}"
                  for k, v in sorted(self.options.items())]
        parts += [f"s{self.seed}", f"{self.train_size or 'all'}x{self.epochs}"]
        return "-".join(parts)

    @property
    def calibration(self) -> bool:
        return self.attack is None and self.seed in CALIBRATION_SEEDS

    def build_attack(self):
        if self.attack is None:
            return None
        return ATTACKS[self.attack](seed=self.seed, **self.options)


def fmnist_population(arch: str) -> list[Victim]:
    # Three training lengths: users bring well-trained models (the bench's victims: the whole set
    # for 8 epochs), on which natural classes need triggers as small as implanted ones.
    short, full, well = {"epochs": 2, "train_size": 20_000}, {"epochs": 4}, {"epochs": 8}
    clean = [Victim("fmnist", arch, None, seed, **(short if seed % 2 == 0 else full)) for seed in range(6)]
    clean += [Victim("fmnist", arch, None, seed, **well) for seed in (6, 7)]
    # Ten calibration models per architecture: five moved a flagging line by a third when retrained.
    clean += [Victim("fmnist", arch, None, seed, **length)
              for seed, length in ((30, short), (31, full), (32, short), (33, full), (34, well), (35, full), (36, well))]
    backdoored = [
        ("badnets", {"size": 3, "position": "corner", "colour": "white", "target": 0, "poison_rate": 0.1}, full),
        ("badnets", {"size": 3, "position": "centre", "colour": "black", "target": 5, "poison_rate": 0.05}, full),
        ("badnets", {"size": 5, "position": "centre", "colour": "random", "target": 9, "poison_rate": 0.01}, full),
        ("badnets", {"size": 4, "position": "edge", "colour": "white", "target": 2, "poison_rate": 0.02}, short),
        ("blended", {"alpha": 0.1, "pattern": "noise", "target": 3, "poison_rate": 0.05}, full),
        ("blended", {"alpha": 0.2, "pattern": "image", "target": 8, "poison_rate": 0.1}, short),
        ("trojan", {"target": 7, "poison_rate": 0.1}, full),
        ("checkerboard", {"size": 4, "target": 1, "poison_rate": 0.05}, short),
        ("sig", {"target": 4}, full),
        ("wanet", {"target": 6, "strength": 1.5, "poison_rate": 0.1}, full),
        ("multi", {"targets": (1, 6), "poison_rate": 0.1}, short),
        ("multi", {"targets": (2, 5, 9), "poison_rate": 0.1}, full),
        ("trojan", {"target": 7, "poison_rate": 0.05}, well),
        ("sig", {"target": 4}, well),
        ("blended", {"alpha": 0.1, "pattern": "noise", "target": 3, "poison_rate": 0.05}, well),
    ]
    return clean + [Victim("fmnist", arch, name, 10 + i, **length, options=options)
                    for i, (name, options, length) in enumerate(backdoored)]


def cifar10_population(arch: str) -> list[Victim]:
    length = {"epochs": 8}
    clean = [Victim("cifar10", arch, None, seed, **length) for seed in range(3)]
    backdoored = [
        ("badnets", {"size": 3, "position": "corner", "colour": "white", "target": 0, "poison_rate": 0.1}),
        ("blended", {"alpha": 0.15, "pattern": "noise", "target": 3, "poison_rate": 0.1}),
        ("trojan", {"target": 7, "poison_rate": 0.05}),
        ("wanet", {"target": 2, "strength": 1.5, "poison_rate": 0.1}),
    ]
    return clean + [Victim("cifar10", arch, name, 20 + i, **length, options=options)
                    for i, (name, options) in enumerate(backdoored)]


# In training priority order: the cheap Fashion-MNIST models first.
POPULATION = (fmnist_population("small_cnn") + fmnist_population("small_resnet") + fmnist_population("mlp")
              + cifar10_population("small_cnn") + cifar10_population("small_resnet"))


@dataclass(frozen=True)
class Split:
    train: tuple[torch.Tensor, torch.Tensor]     # the victim's training pool
    defender: tuple[torch.Tensor, torch.Tensor]  # 5% of the training set, never trained on
    test: tuple[torch.Tensor, torch.Tensor]


def load_dataset(name: str, cache: Path) -> Split:
    x, y = fashion_mnist("train") if name == "fmnist" else cifar10("train", cache)
    test = fashion_mnist("test") if name == "fmnist" else cifar10("test", cache)
    n_def = len(y) // 20
    return Split((x[:-n_def], y[:-n_def]), (x[-n_def:], y[-n_def:]), test)


def train_victim(victim: Victim, data: Split, cache: Path):
    """(TorchScript path, attack, metrics): the victim, trained once and cached with its CA and
    ASR. A TrojanNN trigger is computed from a clean model and cached beside the victim."""
    path = model_path(victim, cache)
    meta_path, trigger_path = path.with_suffix(".json"), path.with_suffix(".trigger.pt")
    attack = victim.build_attack()
    if path.exists() and meta_path.exists():
        if trigger_path.exists():
            attack.pattern = torch.load(trigger_path, weights_only=True)
        return path, attack, json.loads(meta_path.read_text())
    x, y = data.train
    if victim.train_size:
        x, y = x[: victim.train_size], y[: victim.train_size]
    if attack is not None and attack.needs_clean_model:
        clean = train_classifier(victim.arch, x[:10_000], y[:10_000], num_classes=10, epochs=1)
        torch.manual_seed(victim.seed)
        attack.fit(clean, x)
    if attack is not None:
        x, y = attack.poison(x, y)
    print(f"training {victim.key} on {len(x)} images...", flush=True)
    augment = crop_and_flip if victim.dataset == "cifar10" else None
    model = train_classifier(victim.arch, x, y, num_classes=10, epochs=victim.epochs, seed=victim.seed,
                             augment=augment)
    metrics = evaluate(model, attack, *data.test)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(model), str(path))
    if getattr(attack, "pattern", None) is not None and not isinstance(attack.pattern, str):
        torch.save(attack.pattern, trigger_path)
    meta = {"victim": asdict(victim), "key": victim.key, **metrics}
    meta_path.write_text(json.dumps(meta, indent=2))
    print(f"  CA {metrics['ca']:.1%}" + ("" if metrics["asr"] is None else f" ASR {metrics['asr']:.1%}"),
          flush=True)
    return path, attack, meta


def train_all(cache: Path, limit: int | None = None) -> None:
    """Trains the population, the calibration models first (they gate every result)."""
    datasets: dict[str, Split] = {}
    for victim in sorted(POPULATION[:limit], key=lambda v: not v.calibration):
        if victim.dataset not in datasets:
            datasets[victim.dataset] = load_dataset(victim.dataset, cache)
        train_victim(victim, datasets[victim.dataset], cache)


def sanitize_victim(victim: Victim, data: Split, cache: Path, calibration=None) -> dict:
    """Runs the engine on one victim through the same files as `baerase sanitize`; returns its
    report with the true trigger's CA/ASR before and after, and the cost in clean epochs."""
    import tempfile

    from worker.sanitize.config import SanitizeConfig
    from worker.sanitize.pipeline import sanitize

    from .metrics import clean_epoch_seconds
    from .train import save_samples

    path, attack, meta = train_victim(victim, data, cache)
    model = torch.jit.load(str(path)).eval()
    x_def, y_def = data.defender
    epoch_s = clean_epoch_seconds(model, x_def, y_def)
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp, "samples.npz")
        save_samples(samples, x_def, y_def)
        report = sanitize(path, samples, Path(tmp, "out"), SanitizeConfig(seed=0, device="cpu"),
                          calibration=calibration)
        sanitized = Path(tmp, "out", report["model_file"])
        after = evaluate(torch.jit.load(str(sanitized)).eval(), attack, *data.test)
        unchanged = sanitized.read_bytes() == path.read_bytes()
    before = {k: meta[k] for k in ("ca", "asr", "ra")}
    return {"key": victim.key, "victim": asdict(victim), "calibration_model": victim.calibration,
            "backdoored": victim.attack is not None, "before": before, "after": after,
            "unchanged": unchanged, "cost": report["timings_s"]["total"] / epoch_s,
            "epoch_seconds": epoch_s, "report": report}


def detection_scores(victim: Victim, datasets: dict[str, Split], cache: Path) -> dict:
    """Detection alone on one victim (a calibration that flags nothing, so nothing is unlearnt):
    its class scores and cost, cached."""
    from worker.sanitize.detection import Calibration

    path = cache / "population" / "scores" / f"{victim.key}.json"
    if not path.exists():
        if victim.dataset not in datasets:
            datasets[victim.dataset] = load_dataset(victim.dataset, cache)
        print(f"detecting on {victim.key}...", flush=True)
        row = sanitize_victim(victim, datasets[victim.dataset], cache, Calibration.scores_only())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"class_scores": row["report"]["class_scores"], "cost": row["cost"],
                                    "seconds": row["report"]["timings_s"]["total"], "before": row["before"]}))
    return json.loads(path.read_text())


def model_path(victim: Victim, cache: Path) -> Path:
    return cache / "population" / "models" / f"{victim.key}.pt"


def trained_kind(victim: Victim, cache: Path) -> str:
    """The trained victim's model kind (retuning.KINDS): which clean models' fits judge it."""
    from worker.sanitize.retuning import model_kind

    return model_kind(torch.jit.load(str(model_path(victim, cache))))


def trained(limit: int | None, calibration: bool, cache: Path) -> list[Victim]:
    return [v for v in POPULATION[:limit] if v.calibration == calibration and model_path(v, cache).exists()]


UNLEARNT_CLASSES = 3  # a calibration model's most suspicious classes, unlearnt to measure their re-tuning


def retuning_statistics(victim: Victim, datasets: dict[str, Split], cache: Path) -> tuple[str, list[float]]:
    """The re-tuning statistics (worker/sanitize/retuning.py) of one clean calibration model's
    ``UNLEARNT_CLASSES`` most suspicious classes, unlearnt by the engine as if they were targets;
    cached, with the model's kind. What a sanitized model's class shows when no backdoor is left in it.

    The engine is run with a calibration that flags exactly those classes: a line just under the
    last one's score, which the same seed's detection reproduces."""
    from worker.sanitize.config import DetectionConfig
    from worker.sanitize.detection import Calibration, NormalFit, never_dormant
    from worker.sanitize.retuning import KINDS

    path = cache / "population" / "retuning" / f"{victim.key}.json"
    if not path.exists():
        min_asr = DetectionConfig().min_held_out_asr
        scores = [s for s in detection_scores(victim, datasets, cache)["class_scores"] if s["held_out_asr"] >= min_asr]
        tops = {s["class"]: s["score"] for s in reversed(scores)}  # class scores come most suspicious first
        classes = sorted(tops, key=tops.get, reverse=True)[:UNLEARNT_CLASSES]
        line = min(tops[c] for c in classes) - 1e-3
        flag_these = Calibration({kind: 1.0 for kind in KINDS}, {kind: 1.0 for kind in KINDS},
                                 {kind: NormalFit(line, 1e-6, 0) for kind in KINDS}, dict.fromkeys(KINDS, 1),
                                 dict.fromkeys(KINDS, 0), "flags the most suspicious classes", never_dormant())
        print(f"unlearning classes {classes} of {victim.key}...", flush=True)
        if victim.dataset not in datasets:
            datasets[victim.dataset] = load_dataset(victim.dataset, cache)
        row = sanitize_victim(victim, datasets[victim.dataset], cache, flag_these)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"classes": classes, "retuning": row["report"]["verification"]["retuning"]}))
    rows = json.loads(path.read_text())["retuning"]
    if not rows:  # unlearning kept no epoch, so nothing was re-tuned: the fit goes without this model
        print(f"  {victim.key}: unlearning kept no epoch; no re-tuning statistics", flush=True)
        return trained_kind(victim, cache), []
    return rows[0]["kind"], [r["statistic"] for r in rows]


def collect_scores(cache: Path, limit: int | None = None, keep_retuning: bool = False) -> Path:
    """Runs detection alone on every trained calibration model, then unlearns its most
    suspicious classes, and fits the calibration from their scores and re-tuning statistics;
    writes worker/sanitize/calibration.json. A model kind none of whose calibration models is
    trained keeps the fits it has in that file. With ``keep_retuning``, nothing is unlearnt and the
    re-tuning fits are kept: the unlearnt classes are chosen by scores taken at scales 1
    (``retuning_statistics``), which no refit of the detection changes, so the same models
    measure the same statistics again."""
    from worker.sanitize.detection import CALIBRATION_FILE, Calibration, CleanClass
    from worker.sanitize.retuning import KINDS

    victims, datasets = trained(limit, True, cache), {}
    classes = {kind: [] for kind in KINDS}
    retuning = {kind: None if keep_retuning else [] for kind in KINDS}
    for victim in victims:
        if keep_retuning:
            kind = trained_kind(victim, cache)
        else:
            kind, statistics = retuning_statistics(victim, datasets, cache)
            retuning[kind] += statistics
        classes[kind].append([CleanClass(s["family"], s["log_ratio"], s["screen_log_ratio"], s["reference_ratio"],
                                         s.get("excess"))
                              for s in detection_scores(victim, datasets, cache)["class_scores"]])
    kept = [kind for kind in KINDS if not classes[kind]]
    source = "bench/population.py calibration models: " + ", ".join(v.key for v in victims) + "".join(
        f"; {kind}: kept from the previous calibration" for kind in kept) + (
        "; re-tuning fits kept from the previous calibration" if keep_retuning else "")
    calibration = Calibration.fit(classes, retuning, source, keep=Calibration.load())
    CALIBRATION_FILE.write_text(json.dumps(asdict(calibration), indent=2) + "\n")
    print(f"calibration from {len(victims)} clean models, by kind: " + "; ".join(
        f"{kind}{' (kept)' if kind in kept else ''}: {calibration.models[kind]} models, log ratio scale "
        f"{calibration.log_ratio_scale[kind]:.3f}, screen scale {calibration.screen_scale[kind]:.3f}, "
        f"highest of {calibration.tests[kind]} class scores, mean {calibration.scores[kind].mean:.3f}, std "
        f"{calibration.scores[kind].std:.3f}, re-tuning of {fit.count} unlearnt classes, mean {fit.mean:.3f}, "
        f"std {fit.std:.3f}, excess {excess_line(calibration.excess.get(kind))}"
        for kind, fit in calibration.retuning.items()))
    return CALIBRATION_FILE


def excess_line(fit) -> str:
    if fit is None:
        return "not fitted"
    scales = ", ".join(f"{family} {scale:.3f}" for family, scale in fit.scales.items())
    return f"scales {scales}, highest mean {fit.highest.mean:.3f} std {fit.highest.std:.3f}"


def neural_cleanse_scores(victim: Victim, datasets: dict[str, Split], cache: Path) -> dict:
    """Neural Cleanse's detection on one victim (bench/baselines/neural_cleanse.py, its default
    settings, the same defender's images): every class's mask norm, the largest anomaly index of a
    class below the median, and the classes it flags; cached."""
    import time

    from .baselines.neural_cleanse import Settings, flag, largest_anomaly_index, reverse_engineer

    path = cache / "population" / "neural_cleanse" / f"{victim.key}.json"
    if not path.exists():
        if victim.dataset not in datasets:
            datasets[victim.dataset] = load_dataset(victim.dataset, cache)
        model_path, _, _ = train_victim(victim, datasets[victim.dataset], cache)
        print(f"neural cleanse on {victim.key}...", flush=True)
        model = torch.jit.load(str(model_path)).eval()
        x_def, y_def = datasets[victim.dataset].defender
        settings = Settings()
        started = time.perf_counter()
        masks, _ = reverse_engineer(model, x_def, int(y_def.max()) + 1, settings, seed=0)
        seconds = time.perf_counter() - started
        norms = masks.flatten(1).sum(1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"norms": norms.tolist(), "anomaly_index": largest_anomaly_index(norms),
                                    "flagged": flag(norms, settings.anomaly_threshold), "seconds": seconds}))
    return json.loads(path.read_text())


def detection_summary(cache: Path, limit: int | None = None, neural_cleanse: bool = False) -> str:
    """Detection alone on every trained evaluation model, judged by the current calibration: a
    Markdown table of each model's most suspicious class and the ROC-AUC of backdoor_probability;
    with ``neural_cleanse``, Neural Cleanse's anomaly index and flags beside them."""
    from worker.sanitize.config import DetectionConfig
    from worker.sanitize.detection import Calibration

    calibration, flag_line = Calibration.load(), DetectionConfig().flag_probability
    nc_header = " NC anomaly index | NC flags |" if neural_cleanse else ""
    lines = ["| model | targets | top class (family) | score | backdoor_probability | cost (clean epochs) | s |" + nc_header,
             "|---|---|---|---|---|---|---|" + "---|---|" * neural_cleanse]
    ours, theirs, datasets = [], [], {}
    for victim in trained(limit, False, cache):
        result = detection_scores(victim, datasets, cache)
        top, probability = most_suspicious(result["class_scores"], calibration, trained_kind(victim, cache))
        targets = victim.options.get("targets") or ((victim.options["target"],) if victim.attack else ())
        mark = "" if not targets else (" (target)" if top["class"] in targets else " (not a target)")
        line = (f"| {victim.key} | {', '.join(map(str, targets)) or '-'} | {top['class']} ({top['family']}){mark} | "
                f"{top['score']:.2f} | {probability:.3f}{' flagged' if probability >= flag_line else ''} | "
                f"{result['cost']:.1f} | {result['seconds']:.0f} |")
        implanted = None if victim.attack is None else result["before"]["asr"] >= 0.5
        ours.append((implanted, probability))
        if neural_cleanse:
            nc = neural_cleanse_scores(victim, datasets, cache)
            line += f" {nc['anomaly_index']:.2f} | {', '.join(map(str, nc['flagged'])) or 'none'} |"
            theirs.append((implanted, nc["anomaly_index"]))
        lines.append(line)
    lines += ["", roc_auc_line(ours, "backdoor_probability")]
    if neural_cleanse:
        lines.append(roc_auc_line(theirs, "Neural Cleanse's anomaly index"))
    return "\n".join(lines)


def most_suspicious(class_scores: list[dict], calibration, kind: str) -> tuple[dict, float]:
    """The highest-scoring class of cached ``detection_scores`` and the model's backdoor
    probability under ``calibration``. The cache holds scores taken at scales 1
    (``Calibration.scores_only``): each class is scored again at the kind's scales."""
    from worker.sanitize.detection import class_score, smallness

    scale, screen_scale = calibration.log_ratio_scale[kind], calibration.screen_scale[kind]
    scores = [{**s, "score": max(class_score(smallness(s["log_ratio"], s["screen_log_ratio"], screen_scale),
                                             s["reference_ratio"], scale),
                                 calibration.excess_score(s.get("excess"), s["family"], kind))} for s in class_scores]
    top = max(scores, key=lambda s: s["score"])
    return top, calibration.probability(top["score"], len(scores), kind)


def clean_model_asr(victim: Victim, attack, data: Split, cache: Path) -> float | None:
    """The victim's true trigger on the trained calibration models of its data and architecture
    (their mean ASR): what models that never saw a poisoned image do with the same trigger, the
    floor an erased backdoor comes down to (a white square sends 3-5% of Fashion-MNIST images to
    "sandal" on clean small CNNs). None for a clean victim, or when no such model is trained."""
    if attack is None:
        return None
    clean = [v for v in trained(None, True, cache) if (v.dataset, v.arch) == (victim.dataset, victim.arch)]
    rates = [evaluate(torch.jit.load(str(train_victim(v, data, cache)[0])).eval(), attack, *data.test)["asr"]
             for v in clean]
    return sum(rates) / len(rates) if rates else None


def evaluate_all(cache: Path, limit: int | None = None, fresh: bool = False,
                 neural_cleanse: bool = False) -> list[dict]:
    """The engine on every trained evaluation model (cached per model); with ``neural_cleanse``,
    each row also holds Neural Cleanse's detection on the same model."""
    rows = []
    datasets: dict[str, Split] = {}
    for victim in trained(limit, False, cache):
        result_path = cache / "population" / "results" / f"{victim.key}.json"
        if fresh or not result_path.exists():
            if victim.dataset not in datasets:
                datasets[victim.dataset] = load_dataset(victim.dataset, cache)
            print(f"sanitizing {victim.key}...", flush=True)
            row = sanitize_victim(victim, datasets[victim.dataset], cache)
            _, attack, _ = train_victim(victim, datasets[victim.dataset], cache)
            row["clean_model_asr"] = clean_model_asr(victim, attack, datasets[victim.dataset], cache)
            result_path.parent.mkdir(parents=True, exist_ok=True)
            result_path.write_text(json.dumps(row, indent=2))
            r = row["report"]
            print(f"  {r['verdict']} p={r['backdoor_probability']:.3f} CA {row['before']['ca']:.3f}->{row['after']['ca']:.3f}"
                  + ("" if row["after"]["asr"] is None else f" ASR {row['before']['asr']:.3f}->{row['after']['asr']:.3f}")
                  + f" cost {row['cost']:.1f} epochs ({r['timings_s']['total']:.0f} s)", flush=True)
        row = json.loads(result_path.read_text())
        if neural_cleanse:
            row["neural_cleanse"] = neural_cleanse_scores(victim, datasets, cache)
        rows.append(row)
    return rows


def summary(rows: list[dict]) -> str:
    """A Markdown table of the evaluation rows, and the detection ROC-AUC of backdoor_probability
    over the models whose attack implanted (ASR >= 50% before); Neural Cleanse's anomaly index,
    flags and ROC-AUC beside them where the rows hold its results."""
    neural_cleanse = all("neural_cleanse" in row for row in rows) and bool(rows)
    lines = ["| model | verdict | p | CA before -> after | true ASR before -> after | clean models' ASR | "
             "cost (clean epochs) | s |" + " NC anomaly index | NC flags |" * neural_cleanse,
             "|---|---|---|---|---|---|---|---|" + "---|---|" * neural_cleanse]
    for row in rows:
        r, b, a = row["report"], row["before"], row["after"]
        asr = "-" if b["asr"] is None else f"{b['asr']:.1%} -> {a['asr']:.1%}"
        floor = "-" if row.get("clean_model_asr") is None else f"{row['clean_model_asr']:.1%}"
        lines.append(f"| {row['key']} | {r['verdict']} | {r['backdoor_probability']:.3f} | "
                     f"{b['ca']:.1%} -> {a['ca']:.1%} | {asr} | {floor} | {row['cost']:.1f} | "
                     f"{r['timings_s']['total']:.0f} |")
        if neural_cleanse:
            nc = row["neural_cleanse"]
            lines[-1] += f" {nc['anomaly_index']:.2f} | {', '.join(map(str, nc['flagged'])) or 'none'} |"
    implanted = [None if not row["backdoored"] else row["before"]["asr"] >= 0.5 for row in rows]
    lines += ["", roc_auc_line([(i, row["report"]["backdoor_probability"]) for i, row in zip(implanted, rows)],
                               "backdoor_probability")]
    if neural_cleanse:
        lines.append(roc_auc_line([(i, row["neural_cleanse"]["anomaly_index"]) for i, row in zip(implanted, rows)],
                                  "Neural Cleanse's anomaly index"))
    return "\n".join(lines)


def roc_auc_line(models: list[tuple[bool | None, float]], statistic: str) -> str:
    """The ROC-AUC of ``statistic`` over (implanted, value) pairs: the backdoored models whose
    attack implanted (ASR >= 50% before: True) against the clean ones (None); backdoored models
    whose attack did not implant (False) are left out."""
    positives = [value for implanted, value in models if implanted]
    negatives = [value for implanted, value in models if implanted is None]
    pairs = [(p > n) + 0.5 * (p == n) for p in positives for n in negatives]
    auc = f"{sum(pairs) / len(pairs):.3f}" if pairs else "n/a"
    return f"Detection ROC-AUC of {statistic}: {auc} ({len(positives)} backdoored, {len(negatives)} clean evaluation models)"


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="baerase bench --suite population", description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="train the models not cached yet")
    parser.add_argument("--calibrate", action="store_true", help="fit the calibration from the clean calibration models")
    parser.add_argument("--keep-retuning", action="store_true", help="with --calibrate: refit the detection "
                        "alone, keeping the re-tuning fits (nothing is unlearnt)")
    parser.add_argument("--detect", action="store_true", help="detection alone on every trained evaluation "
                        "model: each one's most suspicious class and the ROC-AUC")
    parser.add_argument("--neural-cleanse", action="store_true", help="with --detect or --evaluate: Neural "
                        "Cleanse's anomaly index on the same models, and its ROC-AUC")
    parser.add_argument("--evaluate", action="store_true", help="run the engine on every trained evaluation model")
    parser.add_argument("--fresh", action="store_true", help="recompute cached evaluation results")
    parser.add_argument("--limit", type=int, help="only the first N models of the population")
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench"))
    args = parser.parse_args(argv)
    if args.train:
        train_all(args.cache, args.limit)
    if args.calibrate:
        collect_scores(args.cache, args.limit, args.keep_retuning)
    if args.detect:
        print(detection_summary(args.cache, args.limit, args.neural_cleanse))
    if args.evaluate:
        print(summary(evaluate_all(args.cache, args.limit, args.fresh, args.neural_cleanse)))
    if not (args.train or args.calibrate or args.detect or args.evaluate):
        parser.print_help()
    return 0
