"""What the `baerase` commands share: the one-line error, the config file, the progress bar."""

import json
import sys
from pathlib import Path


def fail(message: str) -> int:
    """Says what is wrong in one `error:` line; exit code 2, bad input, as in every command."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def read_config(path: Path | None) -> dict | None:
    """The JSON object in the file (None without a file); ValueError says what is wrong with it."""
    if path is None:
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read config {path}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config


def progress_bar(quiet: bool):
    """A bar on stderr for a run's stage and fraction (see ``show_progress``)."""
    from tqdm import tqdm

    return tqdm(total=1000, file=sys.stderr, disable=quiet, bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}")


def show_progress(bar, label: str, fraction: float) -> None:
    bar.set_description_str(label[:60].ljust(60))
    bar.update(int(fraction * 1000) - bar.n)
