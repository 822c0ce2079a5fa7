"""The API process: ``create_app`` builds the FastAPI app from settings (the environment by
default). It stores uploads and reads results; it never imports torch or loads a model. With a
broker (production mode) it announces each new job to the Celery workers; without one, workers
poll the database."""

import gc
import logging
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import SQLAlchemyError

from app.api.deps import KNOWN_KEY_TTL_S, TTLCache
from app.api.routes import docs, health, jobs, metrics, webhooks
from app.core.config import Settings
from app.core.security import ensure_api_key
from app.core.db import make_engine, make_sessions
from app.core.metrics import make_registry
from app.api.openapi import install_openapi
from app.api.problems import install_problem_handlers
from app.core.storage import make_artifact_store
from app.ui.routes import router as ui_router
from app.core.job_queue import JobQueue
from worker.sanitize import __version__

log = logging.getLogger(__name__)

DESCRIPTION = """Upload an image classifier and a few clean samples; get back the model with its
backdoor erased, the recovered trigger images and before/after metrics.

Authenticate with `Authorization: Bearer <key>`. Errors are `application/problem+json`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = make_engine(settings.database_url, pool_size=settings.api_threads)
    sessions = make_sessions(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Sync routes and dependencies run in this thread pool, and each holds at most one pooled
        # connection while it runs (app/api/deps.py): with as many connections as threads, none
        # waits for a connection.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        # The objects made at start-up live as long as the process: leave them out of the garbage
        # collector's full passes, which otherwise stall every request now and then.
        gc.freeze()
        if settings.api_key:
            await run_in_threadpool(register_env_key, sessions, settings)
        yield
        engine.dispose()

    # /docs and /redoc are app/api/routes/docs.py's: served without a CDN.
    app = FastAPI(title="BAERASE", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.settings, app.state.engine, app.state.sessions = settings, engine, sessions
    app.state.store = make_artifact_store(settings)
    app.state.known_keys = TTLCache(KNOWN_KEY_TTL_S)  # key hash -> tenant
    app.state.recent_views = TTLCache(settings.status_cache_s)  # job id -> (tenant id, its JSON)
    app.state.job_queue = JobQueue(settings) if settings.broker_url else None
    app.state.metrics = make_registry(sessions, __version__)
    install_problem_handlers(app)
    install_openapi(app)
    app.include_router(docs.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(jobs.router)
    app.include_router(ui_router)
    app.include_router(webhooks.router)
    return app


def register_env_key(sessions, settings: Settings) -> None:
    try:
        with sessions() as session:
            ensure_api_key(session, settings.api_key_tenant, settings.api_key.get_secret_value())
    except SQLAlchemyError as e:
        log.warning("could not register BAERASE_API_KEY (%s); run `baerase db upgrade`", type(e).__name__)
