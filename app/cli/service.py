"""The operator's commands, which run and administer the service: `baerase serve` (the API, and
with --embedded a worker beside it), `baerase worker`, `baerase db upgrade` and `baerase keys
create`. None of them loads torch: a worker runs the engine in a sandboxed child process per job."""

import argparse
import importlib.util
import os
import signal
import subprocess
import sys

from app.cli.common import fail


def add_commands(commands) -> None:
    s = commands.add_parser("serve", help="run the REST API")
    s.add_argument("--embedded", action="store_true",
                   help="also run a worker process, and migrate the database first (SQLite by default)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                   "0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
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


# The engine's packages: what the worker extra adds to the service's.
ENGINE_PACKAGES = ("torch", "safetensors")


def require_engine() -> None:
    """Raises ModuleNotFoundError for the first engine package this installation lacks (main()
    then says which extra to install). A worker imports none of the engine itself (it runs it in a
    child process per job): unchecked, it would start, then fail every job."""
    for name in ENGINE_PACKAGES:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def device_name(value: str) -> str:
    from worker.devices import DEVICE_PATTERN

    if not DEVICE_PATTERN.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not cpu or cuda:N (N = 0, 1, ...)")
    return value


def serve_command(args: argparse.Namespace) -> int:
    if args.embedded:
        require_engine()
    import uvicorn

    from app.core.config import Settings
    from app.core.db import upgrade
    from app.core.logging_setup import setup_logging, uvicorn_log_config
    from app.main import create_app

    settings = Settings()
    setup_logging(settings.log_format, settings.log_level, "api")
    worker = None
    if args.embedded:
        upgrade(settings.database_url, artifact_dir=settings.artifact_dir)
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
          f"Submit a job: baerase submit model.pt --samples clean.npz --wait --server {url}\n"
          f"  or over HTTP: curl -H \"Authorization: Bearer $KEY\" -F model=@model.pt "
          f"-F samples=@clean.npz {url}/jobs\nWeb page: {url}/ui · API docs: {url}/docs",
          file=sys.stderr, flush=True)


def worker_command(args: argparse.Namespace) -> int:
    from app.core.config import Settings
    from app.core.logging_setup import setup_logging
    from worker.devices import worker_devices
    from worker.sandbox import confinement_ready

    require_engine()
    settings = Settings()
    setup_logging(settings.log_format, settings.log_level, "worker")
    try:
        devices = worker_devices(args.device)
    except ValueError as e:
        return fail(str(e))
    if not confinement_ready(settings.sandbox_required):
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

    from worker.runner import serve_polling

    serve_polling(settings, devices[0] if args.device else None)
    return 0


def db_upgrade_command(args: argparse.Namespace) -> int:
    from sqlalchemy.engine import make_url

    from app.core.config import Settings
    from app.core.db import upgrade

    settings = Settings()
    upgrade(settings.database_url, artifact_dir=settings.artifact_dir)
    print(f"{make_url(settings.database_url).render_as_string(hide_password=True)}: schema is up to date")
    return 0


def keys_create_command(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from app.core.config import Settings
    from app.core.db import make_engine, make_sessions
    from app.core.security import create_api_key

    try:
        with make_sessions(make_engine(Settings().database_url))() as session:
            key = create_api_key(session, args.tenant)
    except SQLAlchemyError as e:
        return fail(f"cannot store the key ({type(e).__name__}); run `baerase db upgrade` first "
                    "and check BAERASE_DATABASE_URL")
    print(key)
    print(f"a new key for tenant {args.tenant!r}; it is shown only this once", file=sys.stderr)
    return 0
