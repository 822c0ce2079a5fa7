"""`baerase sanitize`: one model, on this machine, through the same sandboxed engine as the
service's workers (worker/sandbox.py). It never loads the web stack."""

import argparse
import json
import logging
import sys
from pathlib import Path

from app.cli.common import fail, progress_bar, read_config, show_progress


def add_commands(commands) -> None:
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


def sanitize_command(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from worker.sandbox import SandboxError, run_sanitize_sandboxed
    from worker.sanitize.config import SanitizeConfig
    from worker.sanitize.errors import InputError

    try:
        options = read_config(args.config) or {}
        for key in ("arch", "num_classes", "device", "seed"):
            if getattr(args, key) is not None:
                options[key] = getattr(args, key)
        config = SanitizeConfig(**options)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}"
                             for err in e.errors())
        return fail(f"invalid config: {problems}")
    except ValueError as e:
        return fail(str(e))
    if not args.model.is_file():
        return fail(f"model file {args.model} does not exist")

    bar = progress_bar(args.quiet)

    def progress(stage: str, fraction: float, message: str) -> None:
        show_progress(bar, f"{stage}: {message}", fraction)

    # The model is untrusted code: it runs sandboxed, as in the service, but where this machine
    # cannot confine it fully the run goes on (the machine is the user's own) with this warning.
    sandbox_warnings = logging.StreamHandler(sys.stderr)
    sandbox_warnings.setFormatter(logging.Formatter("warning: %(message)s"))
    logging.getLogger("worker.sandbox").addHandler(sandbox_warnings)
    try:
        report = run_sanitize_sandboxed(args.model, args.samples, args.out, config, progress, require=False)
    except InputError as e:
        bar.close()
        return fail(str(e))
    except SandboxError as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    bar.close()
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    summary = {k: report[k] for k in ("verdict", "verdict_reason", "backdoor_probability",
                                      "detected_targets", "residual_targets", "clean_accuracy",
                                      "recovered_asr", "timings_s")}
    print(json.dumps(summary, indent=2))
    return 0
