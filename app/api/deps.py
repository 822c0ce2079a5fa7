"""What the routes depend on: the database sessions, the settings, the artifact store, the caller's
tenant (from the bearer key) and the job named in the path.

Database sessions are short: each one lives inside a single function that runs in one worker
thread (``with sessions() as session:``), and is closed before that function returns. A request
therefore never holds a pooled connection while it waits for a thread, so the pool, sized to the
thread pool (``api_threads``), is never exhausted however many clients wait. The tenant and the
job come back loaded and detached from their session: read their columns, not lazy relations.
"""

import time
from typing import Annotated, Generic, TypeVar

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.job_queries import find_job
from app.api.problems import Problem
from app.core.config import Settings
from app.core.db import Sessions
from app.core.models import Job, Tenant
from app.core.security import hash_key, tenant_for_key
from app.core.storage import ArtifactStore

K, V = TypeVar("K"), TypeVar("V")
# How long the API trusts an API key it has looked up.
KNOWN_KEY_TTL_S = 60


# Plain lookups are async: a sync dependency would cost each request a trip to the thread pool.
async def get_sessions(request: Request) -> Sessions:
    return request.app.state.sessions


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


SessionsDep = Annotated[Sessions, Depends(get_sessions)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]

# auto_error=False: a missing key is answered by our own problem+json 401.
bearer = HTTPBearer(auto_error=False, description="an API key from `baerase keys create`")


async def get_current_tenant(request: Request, sessions: SessionsDep, credentials: Annotated[
        HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Tenant:
    if credentials is None:
        raise Problem(401, "send your API key as 'Authorization: Bearer <key>'; create one with "
                           "`baerase keys create --tenant NAME`", headers={"WWW-Authenticate": "Bearer"})
    # Clients that poll send the same key many times a second, and keys are only ever created:
    # a key found is trusted for KNOWN_KEY_TTL_S (one deleted from the database works that much
    # longer). Unknown keys are not remembered, so a new key works at once.
    known: TTLCache[str, Tenant] = request.app.state.known_keys
    key_hash = hash_key(credentials.credentials)
    tenant = known.get(key_hash)
    if tenant is None:
        tenant = await run_in_threadpool(look_up_key, sessions, credentials.credentials)
        if tenant is None:
            raise Problem(401, "this API key is not known; check it, or create a new one with "
                               "`baerase keys create --tenant NAME`",
                          headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        known.put(key_hash, tenant)
    return tenant


def look_up_key(sessions: Sessions, key: str) -> Tenant | None:
    with sessions() as session:
        return tenant_for_key(session, key)


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]


def get_job(job_id: str, sessions: SessionsDep, tenant: CurrentTenant) -> Job:
    with sessions() as session:
        return find_job(session, tenant, job_id)


JobDep = Annotated[Job, Depends(get_job)]


class TTLCache(Generic[K, V]):
    """A dict whose entries are forgotten ``ttl_s`` seconds after they were put (ttl_s 0: at
    once). It is emptied when it reaches ``size`` entries rather than grow without bound."""

    def __init__(self, ttl_s: float, size: int = 10_000):
        self.ttl_s, self.size = ttl_s, size
        self.entries: dict[K, tuple[V, float]] = {}

    def get(self, key: K) -> V | None:
        value, expires = self.entries.get(key, (None, 0.0))
        return value if time.monotonic() < expires else None

    def put(self, key: K, value: V) -> None:
        if len(self.entries) >= self.size:
            self.entries.clear()
        self.entries[key] = (value, time.monotonic() + self.ttl_s)

    def pop(self, key: K) -> None:
        self.entries.pop(key, None)
