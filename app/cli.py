"""The `baerase` command. Each subcommand imports what it needs when it runs, so the service's
commands never load torch and `baerase sanitize` never loads the web stack."""

import argparse
import json
import sys
from pathlib import Path


def sanitize_command(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from tqdm import tqdm

    from worker.sanitize.config import SanitizeConfig
    from worker.sanitize.errors import InputError
    from worker.sanitize.pipeline import sanitize

    try:
        options = json.loads(args.config.read_text()) if args.config else {}
        if not isinstance(options, dict):
            raise InputError(f"{args.config} must hold a JSON object")
        for key in ("arch", "num_classes", "device", "seed"):
            if getattr(args, key) is not None:
                options[key] = getattr(args, key)
        config = SanitizeConfig(**options)
    except (OSError, json.JSONDecodeError) as e:
        return fail(f"cannot read config {args.config}: {e}")
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}"
                             for err in e.errors())
        return fail(f"invalid config: {problems}")
    except InputError as e:
        return fail(str(e))
    if not args.model.is_file():
        return fail(f"model file {args.model} does not exist")

    bar = tqdm(total=1000, file=sys.stderr, disable=args.quiet,
               bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}")

    def progress(stage: str, fraction: float, message: str) -> None:
        bar.set_description_str(f"{stage}: {message}"[:60].ljust(60))
        bar.update(int(fraction * 1000) - bar.n)

    try:
        report = sanitize(args.model, args.samples, args.out, config, progress)
    except InputError as e:
        bar.close()
        return fail(str(e))
    bar.close()
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    summary = {k: report[k] for k in ("backdoor_detected", "detected_targets", "clean_accuracy",
                                      "recovered_asr", "timings_s")}
    print(json.dumps(summary, indent=2))
    return 0


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baerase", description="Find and erase backdoors in image classifiers.")
    commands = parser.add_subparsers(dest="command", required=True)

    s = commands.add_parser("sanitize", help="sanitize one model locally")
    s.add_argument("model", type=Path, help="TorchScript archive, state_dict (.pt/.pth) or .safetensors")
    s.add_argument("--samples", type=Path, required=True, help=".npz (x, y) or .zip of class folders")
    s.add_argument("--out", type=Path, required=True, help="output directory")
    s.add_argument("--arch", help="built-in architecture of a state_dict / safetensors model")
    s.add_argument("--num-classes", type=int, dest="num_classes")
    s.add_argument("--config", type=Path, help="JSON file of settings (see docs/config.md)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"])
    s.add_argument("--seed", type=int)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(run=sanitize_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
