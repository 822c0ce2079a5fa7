"""`/healthz` (the process is alive) and `/readyz` (the database, at the code's schema, and the
broker can be used)."""

from fastapi import APIRouter, Request
from kombu import Connection
from sqlalchemy.exc import SQLAlchemyError

from app.api.deps import SettingsDep
from app.core.db import current_revision, head_revision
from app.api.problems import Problem

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="The database (and, in production mode, the broker) can be used",
            responses={503: {"description": "a dependency is unreachable; detail says which"}})
def readyz(request: Request, settings: SettingsDep) -> dict:
    try:
        revision = current_revision(request.app.state.engine)
    except SQLAlchemyError as e:
        raise Problem(503, f"the database is unreachable ({type(e).__name__}); check "
                           "BAERASE_DATABASE_URL and that the server is up") from None
    if revision != head_revision():
        raise Problem(503, f"the database schema is at revision {revision}, the code needs "
                           f"{head_revision()}: run `baerase db upgrade`")
    checks = {"database": "ok", "broker": "not configured"}
    if settings.broker_url:
        try:
            with Connection(settings.broker_url, connect_timeout=2) as broker:
                broker.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=2)
        except Exception as e:  # kombu raises transport-specific errors
            raise Problem(503, f"the broker is unreachable ({type(e).__name__}); check "
                               "BAERASE_BROKER_URL and that the broker is up") from None
        checks["broker"] = "ok"
    return {"status": "ok", "checks": checks}
