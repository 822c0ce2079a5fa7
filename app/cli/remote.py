"""The client's commands: `baerase submit`, `status`, `download`, `cancel` and `jobs` talk to a
running service through the Python client (app/client.py). They need httpx alone: a client
install (`pip install baerase`, without the service and worker extras) runs them."""

import argparse
import json
import os
import re
import sys
from pathlib import Path

from app.cli.common import ProgressBar, describe_outcome, fail, read_config
from app.client import (DEFAULT_WAIT_S, ApiError, BaeraseError, Client, NotFound, ServerError, Unauthorized,
                        WaitTimeout)


def add_commands(commands) -> None:
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--server", help="the service's URL (default: $BAERASE_SERVER, else "
                            "http://127.0.0.1:8000)")
    connection.add_argument("--api-key", dest="api_key", help="API key (default: $BAERASE_API_KEY, "
                            "which keeps it out of the process list)")

    s = commands.add_parser("submit", parents=[connection], help="send a model to the service")
    s.add_argument("model", type=Path, nargs="?", help="TorchScript archive, state_dict (.pt/.pth) or "
                   ".safetensors (or give --model-url)")
    s.add_argument("--model-url", dest="model_url", help="instead of MODEL: a URL the server fetches the model "
                   "from (https://, e.g. presigned; s3:// or gs:// where the operator allows)")
    s.add_argument("--samples", type=Path, help=".npz (x, y) or .zip of class folders (or give --samples-url)")
    s.add_argument("--samples-url", dest="samples_url", help="instead of --samples: a URL the server fetches "
                   "the samples from")
    s.add_argument("--config", type=Path, help="JSON file of settings (docs/config.md), webhook_url too")
    s.add_argument("--wait", action="store_true", help="show progress until the job ends; exit code says how")
    s.add_argument("--timeout", type=float, default=DEFAULT_WAIT_S, help="with --wait: give up waiting after "
                   f"this many seconds (exit code 5; the job goes on); default {DEFAULT_WAIT_S:g}")
    s.add_argument("--out", type=Path, help="with --wait: download model, report and triggers here")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(run=submit_command)

    s = commands.add_parser("status", parents=[connection], help="a job's status and result")
    s.add_argument("job_id", help="the id `baerase submit` printed")
    s.add_argument("--json", action="store_true", help="the job as the API returns it")
    s.set_defaults(run=status_command)

    s = commands.add_parser("download", parents=[connection],
                            help="a succeeded job's model, report.json and triggers/*.png")
    s.add_argument("job_id", help="the id `baerase submit` printed")
    s.add_argument("--out", type=Path, required=True, help="output directory")
    s.set_defaults(run=download_command)

    s = commands.add_parser("cancel", parents=[connection], help="cancel a queued or running job")
    s.add_argument("job_id", help="the id `baerase submit` printed")
    s.set_defaults(run=cancel_command)

    s = commands.add_parser("jobs", parents=[connection], help="your jobs, newest first")
    s.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"],
                   help="only the jobs in this state")
    s.add_argument("--limit", type=positive_int, default=20, help="at most this many (default 20)")
    s.add_argument("--json", action="store_true", help="the jobs as the API returns them")
    s.set_defaults(run=jobs_command)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


# Exit codes of the commands that talk to the service (submit, status, download, cancel, jobs);
# README "Clients" lists them for scripts. Bad input exits 2, as in every command (fail()).
EXIT_SUCCEEDED, EXIT_FAILED, EXIT_CANCELLED, EXIT_UNREACHABLE, EXIT_NOT_FINISHED = 0, 1, 3, 4, 5
EXIT_BY_STATUS = {"succeeded": EXIT_SUCCEEDED, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED,
                  "queued": EXIT_NOT_FINISHED, "running": EXIT_NOT_FINISHED}


def submit_command(args: argparse.Namespace) -> int:
    for path, url, path_option, url_option in ((args.model, args.model_url, "MODEL", "--model-url"),
                                               (args.samples, args.samples_url, "--samples", "--samples-url")):
        if (path is None) == (url is None):
            return fail(f"give {path_option} or {url_option}, not {'both' if url else 'neither'}")
        if path is not None and not path.is_file():
            return fail(f"{path} does not exist")
    if args.out and not args.wait:
        return fail("--out needs --wait (or fetch the results later: baerase download ID --out DIR)")
    try:
        config = read_config(args.config)
    except ValueError as e:
        return fail(str(e))

    def submit(client) -> int:
        job = client.submit(args.model, args.samples, config, model_url=args.model_url,
                            samples_url=args.samples_url)
        print(f"submitted job {job.id}", file=sys.stderr, flush=True)
        if not args.wait:
            print(job.id)
            return EXIT_SUCCEEDED
        job_id = job.id
        bar = ProgressBar(args.quiet)

        def show(job) -> None:
            bar.update(job.progress.stage or job.status, job.progress.fraction, job.progress.message or "")

        try:
            job = client.wait(job_id, timeout=args.timeout, on_progress=show)
        except KeyboardInterrupt:
            print(f"stopped waiting; job {job_id} goes on (see `baerase status {job_id}`)", file=sys.stderr)
            return 130
        finally:
            bar.finish()
        if job.status == "succeeded":
            print(f"verdict: {describe_outcome(job.result)}", file=sys.stderr)
        summary = {"id": job.id, "status": job.status, "error": job.error, "result": job.result}
        if job.status == "succeeded" and args.out:
            summary["files"] = [str(path) for path in client.download(job.id, args.out)]
        print(json.dumps(summary, indent=2))
        return job_outcome(job)

    return call_service(args, submit)


def status_command(args: argparse.Namespace) -> int:
    def status(client) -> int:
        job = client.get(args.job_id)
        print(json.dumps(job.data, indent=2) if args.json else describe_job(job))
        return EXIT_BY_STATUS[job.status]

    return call_service(args, status)


def download_command(args: argparse.Namespace) -> int:
    def download(client) -> int:
        job = client.get(args.job_id)
        if job.status != "succeeded":
            return job_outcome(job)
        for path in client.download(job.id, args.out):
            print(path)
        return EXIT_SUCCEEDED

    return call_service(args, download)


def cancel_command(args: argparse.Namespace) -> int:
    def cancel(client) -> int:
        job = client.cancel(args.job_id)
        print(f"job {job.id} cancelled" if job.status == "cancelled" else
              f"job {job.id} is {job.status}: asked to stop; the worker stops it at its next check")
        return EXIT_SUCCEEDED

    return call_service(args, cancel)


def jobs_command(args: argparse.Namespace) -> int:
    def jobs(client) -> int:
        found = client.list(args.status, args.limit)
        if args.json:
            print(json.dumps([job.data for job in found], indent=2))
        else:
            for job in found:
                print(describe_job(job))
        return EXIT_SUCCEEDED

    return call_service(args, jobs)


def describe_job(job) -> str:
    """One line for a person: id, status, then progress, the outcome or the error."""
    line = f"{job.id}  {job.status:<9}  {job.data['inputs']['model']['filename']}"
    if not job.finished:
        return f"{line}  {job.progress.stage or 'waiting'} {job.progress.fraction:.0%}"
    if job.error:
        return f"{line}  {job.error['code']}: {job.error['message']}"
    return line if job.result is None else f"{line}  {describe_outcome(job.result)}"


def job_outcome(job) -> int:
    """Says on stderr why a job did not succeed; its exit code."""
    if job.status == "failed":
        print(f"error: job {job.id} failed ({job.error['code']}): {job.error['message']}", file=sys.stderr)
    elif job.status == "cancelled":
        print(f"error: job {job.id} was cancelled", file=sys.stderr)
    elif not job.finished:
        print(f"error: job {job.id} is still {job.status} ({job.progress.fraction:.0%})", file=sys.stderr)
    return EXIT_BY_STATUS[job.status]


# The server's details name HTTP requests where the remedy is the caller's; these commands' users
# get the command that does the same. Each is a hint of app/api, in its words there.
COMMAND_FOR_REQUEST = [
    (re.compile(r"; list yours with GET /jobs\b"), " for this API key; `baerase jobs` lists yours"),
    (re.compile(r"\(poll /jobs/([\w-]+)\)"), r"(follow it with `baerase status \1`)"),
    (re.compile(r"\(its report stays at /jobs/([\w-]+)/report\)"), r"(its result stays: `baerase status \1 --json`)"),
]
# A path that no route of the API answers (app/api/problems.py): the URL is not a BAERASE API's.
NO_SUCH_ROUTE = re.compile(r"there is no [A-Z]+ \S+; see /docs for the API")


def in_commands(error: ApiError, server: str) -> str:
    """The detail of an error answer as a command's user should read it."""
    if isinstance(error, NotFound) and NO_SUCH_ROUTE.fullmatch(error.detail):
        return (f"{server} does not answer as a BAERASE service ({error.problem.get('instance')} is not "
                "found there); check --server or $BAERASE_SERVER")
    detail = error.detail
    for request, command in COMMAND_FOR_REQUEST:
        detail = request.sub(command, detail)
    return detail


def call_service(args: argparse.Namespace, action) -> int:
    """Runs ``action(client)``; turns the client's errors into one `error:` line and an exit code."""
    client = Client(args.server, args.api_key)
    try:
        with client:
            return action(client)
    except WaitTimeout as e:
        print(f"error: {e}; follow it with `baerase status {e.job.id}`", file=sys.stderr)
        return EXIT_NOT_FINISHED
    except ApiError as e:
        if isinstance(e, ServerError):
            print(f"error: the server failed: {e}", file=sys.stderr)
            return EXIT_UNREACHABLE
        if isinstance(e, Unauthorized) and not (args.api_key or os.environ.get("BAERASE_API_KEY")):
            return fail("no API key: set BAERASE_API_KEY or pass --api-key (an operator creates "
                        "keys with `baerase keys create --tenant NAME`)")
        if isinstance(e, Unauthorized):
            return fail("the server does not know this API key (from --api-key or "
                        "$BAERASE_API_KEY); check it, or ask the operator for a new one")
        return fail(in_commands(e, client.server))
    except BaeraseError as e:  # unreachable, or a damaged download
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
