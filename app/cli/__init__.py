"""The `baerase` command: its parser and ``main``. The commands live by audience: local.py
(`sanitize`), service.py (`serve`, `worker`, `db`, `keys`) and remote.py (the client's `submit`,
`status`, `download`, `cancel`, `jobs`); `baerase bench` is handed to bench/run.py. Each command
imports what it needs when it runs, so the service's commands never load torch, `baerase sanitize`
never loads the web stack, and only `baerase bench` loads the bench."""

import argparse
import sys

from app.cli import local, remote, service
from app.cli.common import fail
from worker.sanitize import __version__

# The extra of pyproject.toml each command needs beyond the client's httpx; the client's own
# commands (submit, status, download, cancel, jobs) need none.
EXTRA_OF_COMMAND = {"sanitize": "worker", "worker": "worker", "serve": "service", "db": "service",
                    "keys": "service", "bench": "bench"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baerase", description="Find and erase backdoors in image classifiers.")
    parser.add_argument("--version", action="version", version=f"baerase {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    local.add_commands(commands)
    service.add_commands(commands)
    remote.add_commands(commands)
    # Listed for --help only: main() hands `baerase bench ...` to bench/run.py's own parser.
    commands.add_parser("bench", help="backdoor models, run every defense, write docs/benchmarks.md "
                        "(baerase bench --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else None
    try:
        if command == "bench":
            from bench.run import main as bench

            return bench(argv[1:])
        args = build_parser().parse_args(argv)
        return args.run(args)
    except ModuleNotFoundError as e:
        if command not in EXTRA_OF_COMMAND:
            raise
        extra = EXTRA_OF_COMMAND[command]
        if command == "serve" and "--embedded" in argv:  # it runs a worker too
            command, extra = "serve --embedded", "worker"
        return fail(f"`baerase {command}` needs {e.name}, which this installation lacks: "
                    f"pip install 'baerase[{extra}]'")
