"""What the `baerase` commands show a person: the progress bar, the verdict line, --version and
--help. No service and no model: these run in milliseconds."""

import argparse
import io
import re

import pytest

from app.cli import build_parser, main
from app.cli.common import ProgressBar, describe_outcome
from worker.sanitize import __version__
from worker.sanitize.architecture_names import ARCHITECTURE_NAMES


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_the_bar_writes_a_line_per_stage_and_per_tenth():
    log = io.StringIO()
    bar = ProgressBar(stream=log)
    for step in range(1, 101):
        bar.update("recovery", 0.03 + 0.37 * step / 100, f"mask triggers, step {step}/100")
    bar.update("unlearning", 0.5, "round 1, step 1/40")
    bar.finish()
    lines = log.getvalue().splitlines()
    assert len(lines) == 6  # 4 tenths crossed in recovery (first line included), then unlearning
    assert lines[0].startswith("recovery     [") and "mask triggers, step 1/100" in lines[0]
    assert lines[-1].startswith("unlearning   [############............]  50%")
    assert all(line.count("recovery") + line.count("unlearning") == 1 for line in lines)  # one stage name
    assert all(re.search(r"\d\d:\d\d elapsed, (\d\d:\d\d|\?) left", line) for line in lines)


def test_the_bar_never_moves_back():
    log = io.StringIO()
    bar = ProgressBar(stream=log)
    bar.update("verification", 0.9, "")
    bar.update("verification", 0.7, "a late message with a lower fraction")
    assert bar.fraction == 0.9 and "90%" in bar.line()


def test_on_a_terminal_the_bar_is_redrawn_in_place_and_finish_ends_its_line():
    terminal = Terminal()
    bar = ProgressBar(stream=terminal)
    bar.update("validate", 0.0, "loading")
    bar.update("recovery", 0.5, "")
    bar.finish()
    out = terminal.getvalue()
    assert out.count("\r") == 2 and out.endswith("\n") and out.count("\n") == 1


def test_quiet_shows_nothing():
    log = io.StringIO()
    bar = ProgressBar(quiet=True, stream=log)
    bar.update("recovery", 0.5, "")
    bar.finish()
    assert log.getvalue() == ""


@pytest.mark.parametrize("result, line", [
    ({"verdict": "removed", "detected_targets": [0, 3], "residual_targets": [],
      "clean_accuracy": {"before": 0.91, "after": 0.905}},
     "removed: backdoor target(s) 0, 3; clean accuracy 91.0% -> 90.5%"),
    ({"verdict": "residual", "detected_targets": [0], "residual_targets": [0],
      "clean_accuracy": {"before": 0.9, "after": 0.8}},
     "residual: backdoor target(s) 0; clean accuracy 90.0% -> 80.0%"),
    ({"verdict": "removed", "detected_targets": [2], "residual_targets": [],
      "clean_accuracy": {"before": 0.9, "after": 0.88, "images": 200, "margin": 0.021}},
     "removed: backdoor target(s) 2; clean accuracy 90.0% -> 88.0% (change +/-2.1% on 200 held-out images)"),
    ({"verdict": "residual", "detected_targets": [2], "residual_targets": [2],
      "clean_accuracy": {"before": 0.9, "after": 0.86, "images": 300, "margin": 0.03},
      "class_accuracy": [{"class": 1, "before": 0.9, "after": 0.97, "images": 30, "margin": 0.08},
                         {"class": 2, "before": 0.8, "after": 0.1, "images": 30, "margin": 0.3},
                         {"class": 3, "before": 0.9, "after": 0.85, "images": 30, "margin": 0.1}]},
     "residual: backdoor target(s) 2; clean accuracy 90.0% -> 86.0% (change +/-3.0% on 300 held-out images); "
     "class 2 80.0% -> 10.0% of its 30 held-out images"),
    ({"verdict": "clean", "backdoor_probability": 0.1234}, "clean (backdoor probability 0.12), model unchanged"),
])
def test_outcome_in_one_line(result, line):
    assert describe_outcome(result) == line


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"baerase {__version__}"


def commands_of(parser: argparse.ArgumentParser, prefix: str = "baerase"):
    """(command line, parser) for every command and sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                yield f"{prefix} {name}", command
                yield from commands_of(command, f"{prefix} {name}")


def test_every_option_of_every_command_is_described():
    commands = dict(commands_of(build_parser()))
    for name, command in commands.items():
        for action in command._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    sanitize_help = commands["baerase sanitize"].format_help()
    assert all(name in sanitize_help.replace("\n", " ").replace("  ", "") for name in ARCHITECTURE_NAMES)
    assert "torchvision:resnet18" in sanitize_help


def test_a_command_whose_extra_is_missing_says_which_to_install(monkeypatch, capsys):
    def without_torch(args):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr("app.cli.local.sanitize_command", without_torch)
    assert main(["sanitize", "m.pt", "--samples", "s.npz", "--out", "o"]) == 2
    assert capsys.readouterr().err == ("error: `baerase sanitize` needs torch, which this installation "
                                       "lacks: pip install 'baerase[worker]'\n")
