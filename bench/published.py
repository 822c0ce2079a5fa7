"""Published results quoted beside ours, never measured here: BackdoorBench's leaderboard
(Wu et al., NeurIPS 2022 Datasets and Benchmarks; https://backdoorbench.github.io), CIFAR-10,
PreAct-ResNet18, 10% poisoning, the defender holding 5% of the clean training data. The values
are those the project's design notes (shared/design/baerase.md, "Public numbers to beat") took
from the leaderboard: (CA, ASR) in percent."""

from .metrics import defense_effectiveness_rating

SOURCE = ("BackdoorBench leaderboard (https://backdoorbench.github.io), CIFAR-10, PreAct-ResNet18, "
          "10% poisoning, defender holds 5% of the clean training data")

BACKDOORBENCH_CIFAR10: dict[str, dict[str, tuple[float, float]]] = {
    "BadNets": {"none": (91.32, 95.03), "FT": (89.96, 1.48), "FP": (91.31, 57.13), "NC": (89.05, 1.27),
                "NAD": (89.87, 2.14), "ANP": (84.17, 0.73), "i-BAU": (89.16, 1.29)},
    "Blended": {"none": (93.47, 99.92), "FT": (92.78, 96.11), "FP": (93.17, 99.26), "NC": (93.47, 99.92),
                "NAD": (92.17, 97.69), "ANP": (86.58, 2.19), "i-BAU": (87.00, 50.53)},
    "WaNet": {"none": (91.25, 89.73), "FT": (93.48, 17.10), "FP": (91.46, 1.09), "NC": (91.80, 7.53),
              "NAD": (93.17, 22.98), "ANP": (85.73, 0.43), "i-BAU": (89.49, 5.21)},
    "InputAware": {"none": (90.67, 98.26), "FT": (93.12, 1.72), "FP": (91.74, 0.04), "NC": (92.61, 0.76),
                   "NAD": (93.18, 1.68), "ANP": (90.36, 1.64), "i-BAU": (89.17, 27.08)},
    "LF": {"none": (93.19, 99.28), "FT": (92.37, 78.44), "FP": (92.90, 98.97), "NC": (91.62, 1.41),
           "NAD": (92.37, 47.83), "ANP": (85.15, 0.60), "i-BAU": (84.36, 44.96)},
    "SSBA": {"none": (92.88, 97.86), "FT": (92.14, 74.79), "FP": (92.54, 83.50), "NC": (90.99, 0.58),
             "NAD": (91.91, 77.40), "ANP": (86.54, 0.39), "i-BAU": (87.67, 3.97)},
    "TrojanNN": {"none": (93.42, 100.0), "FT": (92.42, 5.99), "FP": (92.47, 71.07), "NC": (91.76, 8.22),
                 "NAD": (91.88, 3.73), "ANP": (86.87, 0.20), "i-BAU": (90.37, 2.91)},
}


def published_section() -> list[str]:
    """Markdown lines: the leaderboard's CA / ASR cells and each defense's mean DER over them."""
    defenses = list(next(iter(BACKDOORBENCH_CIFAR10.values())))
    lines = ["## Published, not measured here", "",
             f"Quoted for comparison, not run by this bench: {SOURCE}. CA / ASR (%); DER as above,",
             "computed from these cells. Their victims and training differ from ours: compare the",
             "pattern (which defenses keep accuracy, which leave the backdoor), not single numbers.", "",
             "| attack | " + " | ".join(defenses) + " |", "|---|" + "---|" * len(defenses)]
    for attack, cells in BACKDOORBENCH_CIFAR10.items():
        lines.append(f"| {attack} | " + " | ".join(f"{ca:.2f} / {asr:.2f}" for ca, asr in cells.values()) + " |")
    def rates(cell: tuple[float, float]) -> dict:
        return {"ca": cell[0] / 100, "asr": cell[1] / 100}

    ders = []
    for defense in defenses[1:]:
        values = [defense_effectiveness_rating(rates(c["none"]), rates(c[defense]))
                  for c in BACKDOORBENCH_CIFAR10.values()]
        ders.append(f"{100 * sum(values) / len(values):.1f}")
    lines += ["| **mean DER** | - | " + " | ".join(ders) + " |", ""]
    return lines
