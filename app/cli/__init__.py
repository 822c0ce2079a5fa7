"""The `baerase` command: its parser and ``main``. The commands live by audience: local.py
(`sanitize`), service.py (`serve`, `worker`, `db`, `keys`) and remote.py (the client's `submit`,
`status`, `download`, `cancel`, `jobs`); `baerase bench` is handed to bench/run.py. Each command
imports what it needs when it runs, so the service's commands never load torch, `baerase sanitize`
never loads the web stack, and only `baerase bench` loads the bench."""

import argparse
import sys

from app.cli import local, remote, service


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baerase", description="Find and erase backdoors in image classifiers.")
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
    if argv[:1] == ["bench"]:
        from bench.run import main as bench

        return bench(argv[1:])
    args = build_parser().parse_args(argv)
    return args.run(args)
