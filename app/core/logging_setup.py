"""Log setup for `baerase serve` and `baerase worker`: plain text by default, JSON lines (one
object a line) with BAERASE_LOG_FORMAT=json, as the compose file sets.

Every record logged while ``job_context(job_id, tenant)`` is active (a worker running a job) or
given ``extra={"job_id": ..., "tenant": ...}`` carries those two fields, so an operator can follow
one job or one tenant through the logs of every process. Standard library only.
"""

import contextvars
import json
import logging
import sys
from contextlib import contextmanager
from datetime import UTC, datetime

# (job_id, tenant) of the job this thread or task is working on.
_job: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar("baerase_job", default=None)


@contextmanager
def job_context(job_id, tenant: str | None = None):
    token = _job.set((str(job_id), tenant))
    try:
        yield
    finally:
        _job.reset(token)


class JobContextFilter(logging.Filter):
    """Copies the current job's id and tenant onto each record (unless given with extra=)."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _job.get()
        if current is not None:
            if getattr(record, "job_id", None) is None:
                record.job_id = current[0]
            if getattr(record, "tenant", None) is None:
                record.tenant = current[1]
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                "level": record.levelname, "logger": record.name, "process": record.process,
                "message": record.getMessage()}
        for field in ("job_id", "tenant"):
            value = getattr(record, field, None)
            if value is not None:
                line[field] = str(value)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup_logging(log_format: str = "text", level: str | int = "INFO", process: str = "baerase") -> None:
    """Sends every logger's records to stderr in the chosen format (replaces root's handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobContextFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {process} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def uvicorn_log_config(log_format: str) -> dict | None:
    """uvicorn's own loggers (access log included) through the root handler when in JSON."""
    if log_format != "json":
        return None
    return {"version": 1, "disable_existing_loggers": False,
            "loggers": {name: {"handlers": [], "propagate": True, "level": "INFO"}
                        for name in ("uvicorn", "uvicorn.error", "uvicorn.access")}}
