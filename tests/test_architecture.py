"""The layers stay as pyproject.toml's import-linter contracts draw them: entry points, then the
API and the worker runtime, then the service core, then the engine, each importing only downward."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `lint-imports --no-cache`, run by this interpreter wherever pip put the script.
LINT_IMPORTS = "from importlinter.cli import lint_imports_command; lint_imports_command(['--no-cache'])"


def test_imports_keep_to_the_layers():
    done = subprocess.run([sys.executable, "-c", LINT_IMPORTS], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
