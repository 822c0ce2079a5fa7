"""What the `baerase` commands share: the one-line error, the config file, the progress bar
and its verdict line. Standard library only: the client's commands need nothing but httpx."""

import sys
import time
from pathlib import Path
from typing import TextIO

from worker.sanitize.config_json import parse_config_json


def fail(message: str) -> int:
    """Says what is wrong in one `error:` line; exit code 2, bad input, as in every command."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def read_config(path: Path | None) -> dict | None:
    """The JSON object in the file (None without a file); ValueError says what is wrong with it,
    in the API's words (worker/sanitize/config_json.py)."""
    if path is None:
        return None
    try:
        return parse_config_json(path.read_bytes())
    except OSError as e:
        raise ValueError(f"cannot read config {path}: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"cannot read config {path}: {e}") from None


class ProgressBar:
    """One line on stderr: the stage, a bar, the percentage, the time taken and an estimate of the
    time left. The bar never moves back (a stage that stops early makes it jump forward). On a
    terminal the line is redrawn in place; in a log (a pipe, CI) a line is written when the stage
    changes and every 10%, so the log stays short."""

    WIDTH = 24  # characters of the bar itself
    REDRAW_S = 0.2  # a terminal is redrawn at most this often, unless the stage changes

    def __init__(self, quiet: bool = False, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.in_place = self.stream.isatty()
        self.started = time.monotonic()
        self.fraction, self.stage, self.detail = 0.0, "", ""
        self.drawn_at, self.logged_tenth, self.line_open = 0.0, -1, False

    def update(self, stage: str, fraction: float, detail: str = "") -> None:
        """Shows ``stage`` (validate, recovery, ...) at ``fraction`` of the whole run, in [0, 1]."""
        if self.quiet:
            return
        new_stage = stage != self.stage
        self.stage, self.detail = stage, detail
        self.fraction = max(self.fraction, min(fraction, 1.0))
        now, tenth = time.monotonic(), int(self.fraction * 10)
        if self.in_place and (new_stage or now - self.drawn_at >= self.REDRAW_S or self.fraction == 1.0):
            self.stream.write("\r\033[K" + self.line())
            self.line_open = True
        elif not self.in_place and (new_stage or tenth > self.logged_tenth):
            self.stream.write(self.line() + "\n")
        else:
            return
        self.stream.flush()
        self.drawn_at, self.logged_tenth = now, tenth

    def line(self) -> str:
        filled = round(self.fraction * self.WIDTH)
        elapsed = time.monotonic() - self.started
        # A linear estimate: stages differ in speed, so it settles once a stage or two have run.
        left = clock(elapsed * (1 - self.fraction) / self.fraction) if self.fraction >= 0.02 else "?"
        detail = f"  {self.detail}" if self.detail else ""
        return (f"{self.stage:<12} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.fraction:4.0%}"
                f"  {clock(elapsed)} elapsed, {left} left{detail}")[:160]

    def finish(self) -> None:
        """Ends the line redrawn in place, so that what follows starts a line of its own."""
        if self.line_open:
            self.stream.write("\n")
            self.stream.flush()
            self.line_open = False


def clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


def describe_outcome(result: dict) -> str:
    """A finished run's outcome in a few words, from its report or a job's result: the verdict,
    the backdoor's target classes and the clean accuracy before and after."""
    verdict = result["verdict"]
    if verdict in ("clean", "suspicious"):
        return f"{verdict} (backdoor probability {result['backdoor_probability']:.2f}), model unchanged"
    targets = ", ".join(map(str, result["detected_targets" if verdict == "removed" else "residual_targets"]))
    accuracy = result["clean_accuracy"]
    margin = ("" if accuracy.get("margin") is None  # reports of older versions
              else f" (change +/-{accuracy['margin']:.1%} on {accuracy['images']} held-out images)")
    # A class can lose most of its accuracy while the total loses a few points.
    dropped = [c for c in result.get("class_accuracy", []) if c["after"] < c["before"] - c["margin"]]
    worst = min(dropped, key=lambda c: c["after"] - c["before"], default=None)
    lost = "" if worst is None else (f"; class {worst['class']} {worst['before']:.1%} -> {worst['after']:.1%} "
                                     f"of its {worst['images']} held-out images")
    return (f"{verdict}: backdoor target(s) {targets}; "
            f"clean accuracy {accuracy['before']:.1%} -> {accuracy['after']:.1%}{margin}{lost}")
