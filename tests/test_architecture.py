"""The layers stay as pyproject.toml's import-linter contracts draw them: entry points, then the
API and the worker runtime, then the service core, then the engine, each importing only downward."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_imports_keep_to_the_layers():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint_imports), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
