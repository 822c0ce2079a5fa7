"""`baerase sanitize`: one model, on this machine, through the same sandboxed engine as the
service's workers (worker/sandbox.py). It never loads the web stack."""

import argparse
import json
import logging
import sys
from pathlib import Path

from app.cli.common import ProgressBar, describe_outcome, fail, read_config
from worker.sanitize.architecture_names import ARCHITECTURE_HELP


def add_commands(commands) -> None:
    s = commands.add_parser(
        "sanitize", help="sanitize one model locally",
        description="Recover the model's backdoor triggers, erase them by unlearning, and write the "
                    "sanitized model, report.json and triggers/*.png into --out. Exit code 0 on success, "
                    "2 for bad input, 1 when the engine fails.")
    s.add_argument("model", type=Path, help="a TorchScript archive, or a state_dict (.pt/.pth, a checkpoint "
                   "dict holding one too) or .safetensors file with --arch")
    s.add_argument("--samples", type=Path, required=True, help="clean samples: an .npz with arrays x and y, "
                   "or a .zip of class folders of PNG/JPEG images")
    s.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    s.add_argument("--arch", metavar="NAME", help=f"architecture of a state_dict or safetensors model: {ARCHITECTURE_HELP}")
    s.add_argument("--num-classes", type=int, dest="num_classes", metavar="K",
                   help="number of classes (default: read from the model's last layer)")
    s.add_argument("--config", type=Path, help="JSON file of settings (docs/config.md); the options "
                   "above override its values")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run (default auto: "
                   "a GPU when there is one)")
    s.add_argument("--seed", type=int, help="random seed, for a repeatable run (default 0)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(run=sanitize_command)


def sanitize_command(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from worker.sandbox import SandboxError, run_sanitize_sandboxed
    from worker.sanitize.config import SanitizeConfig
    from worker.sanitize.config_json import describe_invalid_config
    from worker.sanitize.errors import InputError

    try:
        options = read_config(args.config) or {}
        for key in ("arch", "num_classes", "device", "seed"):
            if getattr(args, key) is not None:
                options[key] = getattr(args, key)
        config = SanitizeConfig(**options)
    except ValidationError as e:
        return fail(describe_invalid_config(e.errors())[0])
    except ValueError as e:
        return fail(str(e))
    if not args.model.is_file():
        return fail(f"model file {args.model} does not exist")

    bar = ProgressBar(args.quiet)
    # The model is untrusted code: it runs sandboxed, as in the service, but where this machine
    # cannot confine it fully the run goes on (the machine is the user's own) with this warning.
    sandbox_warnings = logging.StreamHandler(sys.stderr)
    sandbox_warnings.setFormatter(logging.Formatter("warning: %(message)s"))
    logging.getLogger("worker.sandbox").addHandler(sandbox_warnings)
    try:
        report = run_sanitize_sandboxed(args.model, args.samples, args.out, config, bar.update, require=False)
    except InputError as e:
        return fail(str(e))
    except SandboxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        bar.finish()
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    summary = report.headline()
    print(f"verdict: {describe_outcome(summary)}", file=sys.stderr)
    print(json.dumps(summary, indent=2))
    return 0
