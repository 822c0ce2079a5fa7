"""Database engine, sessions and migrations, for PostgreSQL and SQLite alike."""

import logging
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
# What a lost or refused connection (or SQLite's "database is locked") raises: worth retrying.
UNAVAILABLE = (OperationalError, InterfaceError)
# Longest pause between two tries of a write that waits for the database.
MAX_RETRY_DELAY_S = 15.0

log = logging.getLogger(__name__)
T = TypeVar("T")
# What opens a session: ``with sessions() as session: ...``.
Sessions = sessionmaker[Session]


def make_engine(database_url: str, pool_size: int = 5) -> Engine:
    """pool_size: connections kept open, the most that the process's threads use at once."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        # connect_timeout: an unreachable server fails a request in seconds instead of hanging.
        return create_engine(url, pool_size=pool_size, pool_pre_ping=True,
                             connect_args={"connect_timeout": 5})
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    # The API and the worker process write to the same file: wait for each other's locks
    # instead of failing with "database is locked".
    engine = create_engine(url, pool_size=pool_size, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def configure(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")  # off by default; deletes cascade through it
        cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
        cursor.close()

    return engine


def make_sessions(engine: Engine) -> Sessions:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(database_url: str, artifact_dir: Path | None = None) -> Config:
    """``artifact_dir``: the artifact store, for migrations that move files into or out of it
    (default: the settings' own)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # Passed as attributes: ConfigParser would treat a % in the URL as interpolation.
    config.attributes["database_url"] = database_url
    config.attributes["artifact_dir"] = artifact_dir
    return config


def upgrade(database_url: str, revision: str = "head", artifact_dir: Path | None = None) -> None:
    command.upgrade(alembic_config(database_url, artifact_dir), revision)


@cache  # the migration scripts do not change while the process runs
def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def retry_while_unavailable(what: str, transaction: Callable[[], T], give_up_after_s: float) -> T:
    """Runs ``transaction`` (which opens its own session and commits) until it gets through,
    waiting out a database that is restarting or briefly unreachable; re-raises once
    ``give_up_after_s`` has passed. The transaction must be safe to run twice: a commit whose
    answer was lost is retried."""
    deadline, delay = time.monotonic() + give_up_after_s, 0.5
    while True:
        try:
            return transaction()
        except UNAVAILABLE as e:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: the database is unavailable (%s); retrying in %.1f s", what,
                        str(e).splitlines()[0], delay)
            time.sleep(delay)
            delay = min(2 * delay, MAX_RETRY_DELAY_S)
