"""The `baerase` command. Each subcommand imports what it needs when it runs, so the service's
commands never load torch and `baerase sanitize` never loads the web stack."""

import argparse
import json
import sys
from pathlib import Path


def sanitize_command(args: argparse.Namespace) -> int:
    import logging

    from pydantic import ValidationError
    from tqdm import tqdm

    from worker.sandbox import SandboxError, run_sanitize_sandboxed
    from worker.sanitize.config import SanitizeConfig
    from worker.sanitize.errors import InputError

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


def serve_command(args: argparse.Namespace) -> int:
    import os
    import signal
    import subprocess

    import uvicorn

    from app.core.config import Settings
    from app.core.db import upgrade
    from app.core.logging_setup import setup_logging, uvicorn_log_config
    from app.main import create_app

    settings = Settings()
    setup_logging(settings.log_format, settings.log_level, "api")
    worker = None
    if args.embedded:
        upgrade(settings.database_url)
        # A separate process, so that even here the API process never loads a model.
        settings.broker_url = None  # embedded: no broker; the worker polls the database
        worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"],
                                  env=os.environ | {"BAERASE_BROKER_URL": ""})
        print_embedded_help(settings, args, worker.pid)
    # uvicorn re-raises SIGINT/SIGTERM once it has shut down: let both unwind to the finally.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port,
                    **({"log_config": config} if (config := uvicorn_log_config(settings.log_format)) else {}))
    except KeyboardInterrupt:
        pass
    finally:
        if worker:
            worker.terminate()  # it puts a running job back in the queue, then stops
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def print_embedded_help(settings, args: argparse.Namespace, worker_pid: int) -> None:
    from sqlalchemy.engine import make_url

    url = f"http://{args.host}:{args.port}"
    database = make_url(settings.database_url).render_as_string(hide_password=True)
    if settings.api_key:
        key_help = f"use the key in BAERASE_API_KEY (tenant {settings.api_key_tenant!r})"
    else:
        key_help = ("create one with `baerase keys create --tenant NAME`, or start with "
                    "BAERASE_API_KEY=<secret> set")
    print(f"BAERASE embedded mode: database {database}, artifacts in {settings.artifact_dir}, "
          f"worker pid {worker_pid}\nAPI key: {key_help}\n"
          f"Submit a job: curl -H \"Authorization: Bearer $KEY\" -F model=@model.pt "
          f"-F samples=@clean.npz {url}/jobs\nAPI docs: {url}/docs", file=sys.stderr, flush=True)


def worker_command(args: argparse.Namespace) -> int:
    import os
    import signal

    from app.core.config import Settings
    from worker.devices import worker_devices

    from app.core.logging_setup import setup_logging

    settings = Settings()
    setup_logging(settings.log_format, settings.log_level, "worker")
    try:
        devices = worker_devices(args.device)
    except ValueError as e:
        return fail(str(e))
    if not sandbox_ready(settings):
        return 1
    if settings.worker_metrics_port:
        from app.core.metrics import start_worker_metrics

        start_worker_metrics(settings.worker_metrics_port, devices)
    if settings.broker_url:
        from celery.signals import setup_logging as celery_setup_logging

        # Connected, this signal keeps Celery from replacing our handlers with its own format.
        celery_setup_logging.connect(lambda **_: setup_logging(settings.log_format, settings.log_level,
                                                               "worker"), weak=False)
        from worker.celery_worker import serve

        serve(devices)  # Celery handles SIGTERM: it lets the running jobs finish, then stops
        return 0

    from app.core.db import make_engine, make_sessions
    from app.core.storage import LocalArtifactStore
    from worker.runner import work

    if args.device:  # before the engine is imported: CUDA reads it once
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[0]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds like Ctrl-C: requeue, stop
    try:
        work(make_sessions(make_engine(settings.database_url)), LocalArtifactStore(settings.artifact_dir),
             settings)
    except KeyboardInterrupt:
        pass
    return 0


def sandbox_ready(settings) -> bool:
    """Says in the log how the engine will be confined on this machine; False when it cannot be
    confined fully and the settings require it."""
    import logging

    from worker.sandbox import probe

    log = logging.getLogger("worker.sandbox")
    confinement = probe()
    if confinement.complete:
        log.info("engine sandbox: %s", confinement.describe())
        return True
    if settings.sandbox_required:
        log.error("cannot confine the engine fully on this machine (%s). See docs/deploy.md, \"Sandbox\"; "
                  "BAERASE_SANDBOX_REQUIRED=false runs uploaded models anyway, less confined",
                  confinement.describe())
        return False
    log.warning("the engine runs with an incomplete sandbox: %s (see docs/deploy.md, \"Sandbox\")",
                confinement.describe())
    return True


def db_upgrade_command(args: argparse.Namespace) -> int:
    from sqlalchemy.engine import make_url

    from app.core.config import Settings
    from app.core.db import upgrade

    settings = Settings()
    upgrade(settings.database_url)
    print(f"{make_url(settings.database_url).render_as_string(hide_password=True)}: schema is up to date")
    return 0


def keys_create_command(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from app.core.config import Settings
    from app.core.security import create_api_key
    from app.core.db import make_engine, make_sessions

    try:
        with make_sessions(make_engine(Settings().database_url))() as session:
            key = create_api_key(session, args.tenant)
    except SQLAlchemyError as e:
        return fail(f"cannot store the key ({type(e).__name__}); run `baerase db upgrade` first "
                    "and check BAERASE_DATABASE_URL")
    print(key)
    print(f"a new key for tenant {args.tenant!r}; it is shown only this once", file=sys.stderr)
    return 0


# Exit codes of the commands that talk to the service (submit, status, download, cancel, jobs);
# README "Clients" lists them for scripts. Bad input exits 2, as in every command (fail()).
EXIT_SUCCEEDED, EXIT_FAILED, EXIT_CANCELLED, EXIT_UNREACHABLE, EXIT_NOT_FINISHED = 0, 1, 3, 4, 5
EXIT_BY_STATUS = {"succeeded": EXIT_SUCCEEDED, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED,
                  "queued": EXIT_NOT_FINISHED, "running": EXIT_NOT_FINISHED}


def submit_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    for path in (args.model, args.samples):
        if not path.is_file():
            return fail(f"{path} does not exist")
    if args.out and not args.wait:
        return fail("--out needs --wait (or fetch the results later: baerase download ID --out DIR)")
    try:
        config = json.loads(args.config.read_text()) if args.config else None
    except (OSError, json.JSONDecodeError) as e:
        return fail(f"cannot read config {args.config}: {e}")
    if config is not None and not isinstance(config, dict):
        return fail(f"{args.config} must hold a JSON object")

    def submit(client) -> int:
        job = client.submit(args.model, args.samples, config)
        print(f"submitted job {job.id}", file=sys.stderr, flush=True)
        if not args.wait:
            print(job.id)
            return EXIT_SUCCEEDED
        job_id = job.id
        try:
            with tqdm(total=1000, file=sys.stderr, disable=args.quiet,
                      bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}") as bar:
                def show(job) -> None:
                    progress = job.progress
                    bar.set_description_str(f"{progress.stage or job.status}: {progress.message or ''}"[:60].ljust(60))
                    bar.update(int(progress.fraction * 1000) - bar.n)

                job = client.wait(job_id, timeout=args.timeout, on_progress=show)
        except KeyboardInterrupt:
            print(f"stopped waiting; job {job_id} goes on (see `baerase status {job_id}`)", file=sys.stderr)
            return 130
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
    if job.result is None:
        return line
    verdict = job.result["verdict"]
    if verdict in ("clean", "suspicious"):
        return f"{line}  {verdict} (backdoor probability {job.result['backdoor_probability']:.2f}), model unchanged"
    accuracy = job.result["clean_accuracy"]
    targets = job.result["detected_targets" if verdict == "removed" else "residual_targets"]
    return (f"{line}  {verdict}: backdoor target(s) {', '.join(map(str, targets))}; "
            f"clean accuracy {accuracy['before']:.1%} -> {accuracy['after']:.1%}")


def job_outcome(job) -> int:
    """Says on stderr why a job did not succeed; its exit code."""
    if job.status == "failed":
        print(f"error: job {job.id} failed ({job.error['code']}): {job.error['message']}", file=sys.stderr)
    elif job.status == "cancelled":
        print(f"error: job {job.id} was cancelled", file=sys.stderr)
    elif not job.finished:
        print(f"error: job {job.id} is still {job.status} ({job.progress.fraction:.0%})", file=sys.stderr)
    return EXIT_BY_STATUS[job.status]


def call_service(args: argparse.Namespace, action) -> int:
    """Runs ``action(client)``; turns the client's errors into one `error:` line and an exit code."""
    from app.client import ApiError, BaeraseError, Client, ServerError, WaitTimeout

    try:
        with Client(args.server, args.api_key) as client:
            return action(client)
    except WaitTimeout as e:
        print(f"error: {e}; follow it with `baerase status {e.job.id}`", file=sys.stderr)
        return EXIT_NOT_FINISHED
    except ApiError as e:
        if isinstance(e, ServerError):
            print(f"error: the server failed: {e}", file=sys.stderr)
            return EXIT_UNREACHABLE
        return fail(e.detail)
    except BaeraseError as e:  # unreachable, or a damaged download
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def device_name(value: str) -> str:
    from worker.devices import DEVICE_PATTERN

    if not DEVICE_PATTERN.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not cpu or cuda:N (N = 0, 1, ...)")
    return value


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

    s = commands.add_parser("serve", help="run the REST API")
    s.add_argument("--embedded", action="store_true",
                   help="also run a worker process, and migrate the database first (SQLite by default)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(run=serve_command)

    s = commands.add_parser("worker", help="run jobs: a Celery worker when BAERASE_BROKER_URL is set, "
                                          "else poll the database (serve --embedded starts one)")
    s.add_argument("--device", type=device_name, help="cpu or cuda:N: run on that device only "
                   "(default: one job at a time on each GPU, or on the CPU when there is none)")
    s.set_defaults(run=worker_command)

    db = commands.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    s = db.add_parser("upgrade", help="create or migrate the tables to the latest schema")
    s.set_defaults(run=db_upgrade_command)

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    s = keys.add_parser("create", help="create an API key and print it")
    s.add_argument("--tenant", required=True, help="the tenant the key belongs to (created if new)")
    s.set_defaults(run=keys_create_command)

    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--server", help="the service's URL (default: $BAERASE_SERVER, else "
                            "http://127.0.0.1:8000)")
    connection.add_argument("--api-key", dest="api_key", help="API key (default: $BAERASE_API_KEY, "
                            "which keeps it out of the process list)")

    s = commands.add_parser("submit", parents=[connection], help="send a model to the service")
    s.add_argument("model", type=Path, help="TorchScript archive, state_dict (.pt/.pth) or .safetensors")
    s.add_argument("--samples", type=Path, required=True, help=".npz (x, y) or .zip of class folders")
    s.add_argument("--config", type=Path, help="JSON file of settings (docs/config.md), webhook_url too")
    s.add_argument("--wait", action="store_true", help="show progress until the job ends; exit code says how")
    s.add_argument("--timeout", type=float, help="with --wait: give up waiting after this many seconds")
    s.add_argument("--out", type=Path, help="with --wait: download model, report and triggers here")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(run=submit_command)

    s = commands.add_parser("status", parents=[connection], help="a job's status and result")
    s.add_argument("job_id")
    s.add_argument("--json", action="store_true", help="the job as the API returns it")
    s.set_defaults(run=status_command)

    s = commands.add_parser("download", parents=[connection],
                            help="a succeeded job's model, report.json and triggers/*.png")
    s.add_argument("job_id")
    s.add_argument("--out", type=Path, required=True, help="output directory")
    s.set_defaults(run=download_command)

    s = commands.add_parser("cancel", parents=[connection], help="cancel a queued or running job")
    s.add_argument("job_id")
    s.set_defaults(run=cancel_command)

    s = commands.add_parser("jobs", parents=[connection], help="your jobs, newest first")
    s.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    s.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    s.add_argument("--json", action="store_true", help="the jobs as the API returns them")
    s.set_defaults(run=jobs_command)

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


if __name__ == "__main__":
    sys.exit(main())
