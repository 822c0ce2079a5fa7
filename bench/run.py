"""The evaluation bench: backdoor models (cached), run every defense on each, write table and plot.

    baerase bench --suite fmnist           # the whole grid -> docs/benchmarks.md, docs/benchmarks.png
    baerase bench --suite fmnist --quick   # small CNN, BadNets and a clean model, tiny defense settings

Every (architecture, attack, defense) result is cached as JSON, so an interrupted run resumes
where it stopped and the table is always rebuilt from every cached result of the suite;
``--fresh`` recomputes the rows this run selects (after a code change, say).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.sanitize.architectures import build_model

from .attacks import ATTACKS
from .baselines import DEFENSES, get_defense
from .datasets import digits, fashion_mnist
from .metrics import clean_epoch_seconds, defense_effectiveness_rating, evaluate
from .report import write_plot, write_table
from .train import train_classifier

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


def fashion_mnist_data() -> Data:
    x, y = fashion_mnist("train")
    # BackdoorBench's defender holds 5% of the training set: 3,000 of Fashion-MNIST's 60,000.
    return Data((x[:57_000], y[:57_000]), (x[57_000:], y[57_000:]), fashion_mnist("test"))


def digits_data() -> Data:
    x, y = digits()  # 1,797 images: only big enough to exercise the bench, not to rank defenses
    return Data((x[:1200], y[:1200]), (x[1200:1500], y[1200:1500]), (x[1500:], y[1500:]))


@dataclass(frozen=True)
class Suite:
    data: Callable[[], Data]  # loads the victim's, the defender's and the test images
    archs: tuple[str, ...]
    attacks: tuple[str, ...]
    train_size: int
    epochs: int


ALL_ATTACKS = tuple(ATTACK_SETTINGS)
SUITES = {
    "fmnist": Suite(fashion_mnist_data, ("small_cnn", "small_resnet"), ALL_ATTACKS, 30_000, 3),
    "digits": Suite(digits_data, ("small_cnn",), ALL_ATTACKS, 1200, 10),
}
QUICK = {"archs": ("small_cnn",), "attacks": ("clean", "badnets"), "train_size": 10_000}


def training_set(suite: Suite, data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    return data.train[0][: suite.train_size], data.train[1][: suite.train_size]


def victim(suite: Suite, data: Data, arch: str, attack_name: str, cache: Path):
    """(model, attack): the model trained on the suite's training set poisoned by the attack
    (None for "clean"), the model from the cache when it is there."""
    x, y = training_set(suite, data)
    settings = ATTACK_SETTINGS[attack_name]
    attack = None if settings is None else ATTACKS[attack_name](**settings)
    if attack is not None and attack.needs_clean_model:
        torch.manual_seed(0)  # the trigger must come out the same on a cached run
        attack.fit(victim(suite, data, arch, "clean", cache)[0], x)
    num_classes = int(y.max()) + 1
    path = cache / "models" / f"{arch}-{attack_name}-{suite.train_size}x{suite.epochs}.pt"
    if path.exists():
        model = build_model(arch, num_classes, x.shape[1])
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), attack
    if attack is not None:
        x, y = attack.poison(x, y)
    print(f"training {arch} on {len(x)} images ({attack_name})...", flush=True)
    model = train_classifier(arch, x, y, num_classes, epochs=suite.epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, attack


def defend_and_measure(model, attack, defense: str, data: Data, num_classes: int, quick: bool) -> dict:
    """One cell of the table: the defense's result on this model, its wall time and its cost."""
    x_def, y_def = data.defender
    epoch_s = clean_epoch_seconds(model, x_def, y_def)
    started = time.perf_counter()
    defended = get_defense(defense)(model, x_def, y_def, num_classes, seed=0, quick=quick)
    seconds = time.perf_counter() - started
    return {**evaluate(defended, attack, *data.test), "seconds": seconds, "cost": seconds / epoch_s}


def suite_as_run(name: str, quick: bool) -> Suite:
    suite = SUITES[name]
    if not quick:
        return suite
    return Suite(suite.data, QUICK["archs"], QUICK["attacks"], min(QUICK["train_size"], suite.train_size),
                 suite.epochs)


def run(suite: Suite, data: Data, results: Path, cache: Path, *, archs, attacks, defenses,
        quick: bool, fresh: bool) -> None:
    """Fills ``results`` with one JSON file per selected (architecture, attack, defense)."""
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
                after = (before | {"seconds": 0.0, "cost": 0.0} if defense == "none" else
                         defend_and_measure(model, attack, defense, data, num_classes, quick))
                row = {"arch": arch, "attack": attack_name, "defense": defense, **after,
                       "der": None if defense == "none" else defense_effectiveness_rating(before, after),
                       "before": before, "commit": git_commit(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(row, indent=2))
                asr = "-" if row["asr"] is None else f"{row['asr']:.1%}"
                print(f"CA {row['ca']:.1%} ASR {asr} ({row['seconds']:.0f} s)", flush=True)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), CPU only")


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--suite", choices=sorted(SUITES) + ["population"], default="fmnist",
                        help="population: the engine's development population (--suite population --help)")
    parser.add_argument("--quick", action="store_true", help="small CNN, BadNets and a clean model, "
                        "tiny settings: a few minutes")
    parser.add_argument("--archs", nargs="+", help="only these architectures")
    parser.add_argument("--attacks", nargs="+", choices=list(ATTACK_SETTINGS), help="only these attacks")
    parser.add_argument("--defenses", nargs="+", choices=list(DEFENSES), help="only these defenses")
    parser.add_argument("--fresh", action="store_true", help="recompute the selected rows even if cached")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: rewrite the table and plot from the cached results")
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench"),
                        help="trained models and per-row results (default .cache/bench)")
    parser.add_argument("--out", type=Path, help="where benchmarks.md and benchmarks.png go "
                        "(default docs/, or bench-out/ with --quick)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["--suite", "population"]:  # the engine's development population: its own options
        from .population import main as population

        return population(argv[2:])
    parser = build_parser(argparse.ArgumentParser(prog="baerase bench", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    suite = suite_as_run(args.suite, args.quick)
    data = suite.data()
    results = args.cache / "results" / (args.suite + ("-quick" if args.quick else ""))
    if not args.table_only:
        run(suite, data, results, args.cache, archs=args.archs or suite.archs,
            attacks=args.attacks or suite.attacks, defenses=args.defenses or list(DEFENSES),
            quick=args.quick, fresh=args.fresh)

    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*/*/*.json"))]
    order = {"arch": list(suite.archs), "attack": list(suite.attacks), "defense": ["none", *DEFENSES]}
    setup = (f"{args.suite}: each victim trained on {suite.train_size} images for {suite.epochs} epochs, "
             f"10% poisoning unless the attack says otherwise; the defender holds {len(data.defender[1])} "
             f"clean images; {len(data.test[1])} test images")
    out = args.out or Path("bench-out" if args.quick else "docs")
    # The table holds every cached row of the suite, whichever runs filled them: the command
    # that reproduces it is the whole suite's.
    command = f"baerase bench --suite {args.suite}" + (" --quick" if args.quick else "")
    write_table(rows, out / "benchmarks.md", command=command, machine=machine(), setup=setup, order=order)
    write_plot(rows, out / "benchmarks.png", order=order)
    print(f"wrote {out / 'benchmarks.md'} and {out / 'benchmarks.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
