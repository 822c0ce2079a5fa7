"""The evaluation bench: backdoor models (cached), run every defense on each, write table and plot.

    baerase bench --suite fmnist           # the whole grid -> docs/benchmarks.md, docs/benchmarks.png
    baerase bench --suite fmnist --quick   # small CNN, BadNets and a clean model, tiny defense settings
    baerase bench --suite cifar10 --device cuda   # VGG-11 with and without BatchNorm, on a GPU -> docs/benchmarks-cifar10.md

Every (architecture, attack, defense) result is kept as JSON in bench/results, which is committed
with the code: an interrupted run resumes where it stopped, rows measured in other sessions and on
other machines (a GPU for CIFAR-10) add up, and the table is always rebuilt from every kept result
of the suite (of its victims' current training setting); ``--fresh`` recomputes the rows this run
selects (after a code change, say). Trained models stay in the local cache (.cache/bench).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from worker.sanitize.architectures import build_model
from worker.sanitize.errors import InputError
from worker.sanitize.pipeline import pick_device
from worker.sanitize.retuning import poison_count

from .attacks import ATTACKS
from .baselines import DEFENSES, get_defense
from .datasets import cifar10, digits, fashion_mnist
from .metrics import clean_epoch_seconds, clock, defense_effectiveness_rating, evaluate, retuned
from .report import write_plot, write_table
from .train import crop_and_flip, train_classifier

# Attack name -> constructor arguments. Targets differ on purpose: a defense must not lean on
# class 0. "clean" is the model without a backdoor: a defense should leave it as it was.
ATTACK_SETTINGS = {
    "clean": None,
    "badnets": {"target": 0},
    "blended": {"target": 3},
    "trojan": {"target": 7},
    "sig": {"target": 4},
    "wanet": {"target": 2},
    "multi": {"targets": (1, 6)},
}


@dataclass(frozen=True)
class Data:
    train: tuple[torch.Tensor, torch.Tensor]     # the victim's training pool
    defender: tuple[torch.Tensor, torch.Tensor]  # the defender's clean set, never trained on
    test: tuple[torch.Tensor, torch.Tensor]

    def to(self, device: torch.device) -> "Data":
        return Data(*((x.to(device), y.to(device)) for x, y in (self.train, self.defender, self.test)))


# Each loader takes the cache folder, where CIFAR-10's decoded images are kept.
def fashion_mnist_data(cache: Path) -> Data:
    x, y = fashion_mnist("train")
    # BackdoorBench's defender holds 5% of the training set: 3,000 of Fashion-MNIST's 60,000.
    return Data((x[:57_000], y[:57_000]), (x[57_000:], y[57_000:]), fashion_mnist("test"))


def cifar10_data(cache: Path) -> Data:
    x, y = cifar10("train", cache)
    n_defender = len(y) // 20  # the last 5% (2,500 images), as BackdoorBench and the population suite
    return Data((x[:-n_defender], y[:-n_defender]), (x[-n_defender:], y[-n_defender:]),
                cifar10("test", cache))


def digits_data(cache: Path) -> Data:
    x, y = digits()  # 1,797 images: only big enough to exercise the bench, not to rank defenses
    return Data((x[:1200], y[:1200]), (x[1200:1500], y[1200:1500]), (x[1500:], y[1500:]))


@dataclass(frozen=True)
class Suite:
    name: str
    data: Callable[[Path], Data]  # loads the victim's, the defender's and the test images
    archs: tuple[str, ...]
    attacks: tuple[str, ...]
    train_size: int  # the first train_size images of the training pool
    epochs: int
    augment: Callable | None = None  # applied to every batch the victims train on

    @property
    def victim_setting(self) -> str:
        """What, beside the architecture and the attack, makes two of the suite's victims differ."""
        return f"{self.train_size}x{self.epochs}" + ("-augmented" if self.augment else "")


ALL_ATTACKS = tuple(ATTACK_SETTINGS)
# CIFAR-10 takes the single-trigger attacks and the clean model: the two-trigger model is
# Fashion-MNIST's, and each CIFAR-10 row costs GPU time.
CIFAR10_ATTACKS = ("clean", "badnets", "blended", "trojan", "sig", "wanet")
# Victims are trained until clean accuracy levels off, as the models users bring are; the "none"
# column's CA records where each one ended. Chosen, not yet measured here:
# - fmnist: the whole 57,000-image pool for 8 epochs (about 3,600 Adam steps at lr 1e-3, no
#   schedule). The small CNN reached 88% after 3 epochs on 30,000 images; CNNs of this size
#   typically level off at 91-92% on Fashion-MNIST within 5-10 epochs, and without augmentation
#   more epochs mostly overfit.
# - cifar10: the 47,500 images beside the defender's for 30 epochs with random crops and flips
#   and a cosine schedule to zero, which typically ends VGG-11 within a point or two of a
#   100-epoch run; 30 epochs of VGG-11 take minutes on a GPU, where these rows are meant to run
#   (hours on two CPU cores).
# - digits: the test suite's; 1,200 images for 10 epochs (seconds).
SUITES = {suite.name: suite for suite in (
    Suite("fmnist", fashion_mnist_data, ("small_cnn", "small_resnet"), ALL_ATTACKS, 57_000, 8),
    Suite("cifar10", cifar10_data, ("vgg11", "vgg11_nobn"), CIFAR10_ATTACKS, 47_500, 30, crop_and_flip),
    Suite("digits", digits_data, ("small_cnn",), ALL_ATTACKS, 1200, 10),
)}
QUICK = {"archs": ("small_cnn",), "attacks": ("clean", "badnets"), "train_size": 10_000}


def training_set(suite: Suite, data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    return data.train[0][: suite.train_size], data.train[1][: suite.train_size]


def victim(suite: Suite, data: Data, arch: str, attack_name: str, cache: Path):
    """(model, attack): the model trained on the suite's training set poisoned by the attack
    (None for "clean"), the model from the cache when it is there; on the data's device."""
    x, y = training_set(suite, data)
    settings = ATTACK_SETTINGS[attack_name]
    attack = None if settings is None else ATTACKS[attack_name](**settings)
    if attack is not None and attack.needs_clean_model:
        torch.manual_seed(0)  # the trigger must come out the same on a cached run
        attack.fit(victim(suite, data, arch, "clean", cache)[0], x)
    num_classes = int(y.max()) + 1
    # Everything that makes two victims differ is in the path: a model trained for another
    # setting is never reused for this one.
    path = cache / "models" / suite.name / f"{arch}-{attack_name}-{suite.victim_setting}.pt"
    if path.exists():
        model = build_model(arch, num_classes, x.shape[1]).to(x.device)
        model.load_state_dict(torch.load(path, weights_only=True, map_location=x.device))
        return model.eval(), attack
    if attack is not None:
        x, y = attack.poison(x, y)
    print(f"training {arch} on {len(x)} images ({attack_name})...", flush=True)
    model = train_classifier(arch, x, y, num_classes, epochs=suite.epochs, augment=suite.augment)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole, then renamed: a run beside this one (bench/parallel.sh) that finds the file
    # never reads half of it.
    partial = path.with_suffix(".partial")
    torch.save(model.state_dict(), partial)
    partial.replace(path)
    return model, attack


def defend_and_measure(model, attack, defense: str, data: Data, num_classes: int, quick: bool):
    """(defended model, its cell of the table): the defense's result on this model, its wall
    time, its cost and what it concluded about the model."""
    x_def, y_def = data.defender
    epoch_s = clean_epoch_seconds(model, x_def, y_def)
    started = clock(x_def.device)
    defended, findings = get_defense(defense)(model, x_def, y_def, num_classes, seed=0, quick=quick)
    seconds = clock(x_def.device) - started
    return defended, {**evaluate(defended, attack, *data.test), "seconds": seconds, "cost": seconds / epoch_s,
                      "findings": findings}


def suite_as_run(name: str, quick: bool) -> Suite:
    suite = SUITES[name]
    if not quick:
        return suite
    return replace(suite, archs=QUICK["archs"], attacks=QUICK["attacks"],
                   train_size=min(QUICK["train_size"], suite.train_size))


def results_folder(root: Path, suite: Suite, quick: bool) -> Path:
    """The suite's kept rows; rows measured on victims of another setting lie elsewhere."""
    return root / f"{suite.name}-{suite.victim_setting}{'-quick' if quick else ''}"


def run(suite: Suite, data: Data, results: Path, cache: Path, *, archs, attacks, defenses,
        quick: bool, fresh: bool, device: torch.device) -> None:
    """Fills ``results`` with one JSON file per selected (architecture, attack, defense), each
    measured on ``device``, where ``data`` lies."""
    num_classes = int(data.train[1].max()) + 1
    for arch in archs:
        for attack_name in attacks:
            model, attack = victim(suite, data, arch, attack_name, cache)
            before = evaluate(model, attack, *data.test)
            for defense in ["none", *defenses]:
                path = results / arch / attack_name / f"{defense}.json"
                if path.exists() and not fresh:
                    continue
                print(f"{arch} / {attack_name} / {defense}...", end=" ", flush=True)
                if defense == "none":
                    defended, after = model, before | {"seconds": 0.0, "cost": 0.0, "findings": {}}
                else:
                    defended, after = defend_and_measure(model, attack, defense, data, num_classes, quick)
                row = {"arch": arch, "attack": attack_name, "defense": defense, **after,
                       "der": None if defense == "none" else defense_effectiveness_rating(before, after),
                       **retuned(defended, attack, data.defender, data.test),
                       "before": before, "device": device.type, "machine": machine(device),
                       "commit": git_commit(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(row, indent=2))
                shown = {k: "-" if row[k] is None else f"{row[k]:.1%}" for k in ("ca", "asr", "asr_retuned")}
                print(f"CA {shown['ca']} ASR {shown['asr']} (re-tuned {shown['asr_retuned']}), "
                      f"{row['seconds']:.0f} s", flush=True)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(device: torch.device) -> str:
    """The machine as a row measured on ``device`` saw it."""
    where = f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "CPU only"
    return (f"{platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), {where}")


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--suite", choices=sorted(SUITES) + ["population"], default="fmnist",
                        help="population: the engine's development population (--suite population --help)")
    parser.add_argument("--quick", action="store_true", help="small CNN, BadNets and a clean model, "
                        "tiny settings: a few minutes")
    parser.add_argument("--archs", nargs="+", help="only these architectures")
    parser.add_argument("--attacks", nargs="+", choices=list(ATTACK_SETTINGS), help="only these attacks")
    parser.add_argument("--defenses", nargs="+", choices=list(DEFENSES), help="only these defenses")
    parser.add_argument("--fresh", action="store_true", help="recompute the selected rows even if cached")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the victims train and the defenses run (auto: cuda when there is one); "
                        "each row records it")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: rewrite the table and plot from the kept results")
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench"),
                        help="trained models and decoded images (default .cache/bench)")
    parser.add_argument("--results", type=Path, help="the per-row results (default bench/results, "
                        "committed with the code; bench-out/results with --quick)")
    parser.add_argument("--out", type=Path, help="where benchmarks[-SUITE].md and .png go "
                        "(default docs/, or bench-out/ with --quick)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["--suite", "population"]:  # the engine's development population: its own options
        from .population import main as population

        return population(argv[2:])
    parser = build_parser(argparse.ArgumentParser(prog="baerase bench", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
    except InputError as e:
        parser.error(str(e))
    suite = suite_as_run(args.suite, args.quick)
    data = suite.data(args.cache)
    results = results_folder(args.results or Path("bench-out/results" if args.quick else "bench/results"),
                             suite, args.quick)
    if not args.table_only:
        run(suite, data.to(device), results, args.cache, archs=args.archs or suite.archs,
            attacks=args.attacks or suite.attacks, defenses=args.defenses or list(DEFENSES),
            quick=args.quick, fresh=args.fresh, device=device)

    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*/*/*.json"))]
    order = {"arch": list(suite.archs), "attack": list(suite.attacks), "defense": ["none", *DEFENSES]}
    defender_size = len(data.defender[1])
    setup = (f"{args.suite}: each victim trained on {suite.train_size} of {len(data.train[1])} training "
             f"images for {suite.epochs} epochs{' with random crops and flips' if suite.augment else ''} "
             "(its clean accuracy: the \"none\" column's CA), 10% poisoning unless the attack says "
             f"otherwise; the defender holds {defender_size} clean images, and re-tuning adds "
             f"{poison_count(defender_size)} poisoned ones; {len(data.test[1])} test images")
    out = args.out or Path("bench-out" if args.quick else "docs")
    # The table holds every cached row of the suite, whichever runs filled them: the command
    # that reproduces it is the whole suite's.
    command = f"baerase bench --suite {args.suite}" + (" --quick" if args.quick else "")
    # One table per suite; Fashion-MNIST's is the one the docs link as benchmarks.md.
    name = "benchmarks" if args.suite == "fmnist" else f"benchmarks-{args.suite}"
    write_table(rows, out / f"{name}.md", command=command, setup=setup, order=order)
    write_plot(rows, out / f"{name}.png", order=order)
    print(f"wrote {out / name}.md and {out / name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
