"""What the routes depend on: the database sessions, the settings, the artifact store, the caller's
tenant (from the bearer key) and the job named in the path.

Database sessions are short: each one lives inside a single function that runs in one worker
thread (``with sessions() as session:``), and is closed before that function returns. A request
therefore never holds a pooled connection while it waits for a thread, so the pool, sized to the
thread pool (``api_threads``), is never exhausted however many clients wait. The tenant and the
job come back loaded and detached from their session: read their columns, not lazy relations.
"""

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from app import crud
from app.core.config import Settings
from app.core.security import tenant_for_key
from app.models import Job, Tenant
from app.problems import Problem
from app.storage import ArtifactStore


def get_sessions(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]

# auto_error=False: a missing key is answered by our own problem+json 401.
bearer = HTTPBearer(auto_error=False, description="an API key from `baerase keys create`")


def get_current_tenant(sessions: SessionsDep,
                       credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Tenant:
    if credentials is None:
        raise Problem(401, "send your API key as 'Authorization: Bearer <key>'; create one with "
                           "`baerase keys create --tenant NAME`", headers={"WWW-Authenticate": "Bearer"})
    with sessions() as session:
        tenant = tenant_for_key(session, credentials.credentials)
    if tenant is None:
        raise Problem(401, "this API key is not known; check it, or create a new one with "
                           "`baerase keys create --tenant NAME`",
                      headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]


def get_job(job_id: str, sessions: SessionsDep, tenant: CurrentTenant) -> Job:
    with sessions() as session:
        return crud.get_job(session, tenant, job_id)


JobDep = Annotated[Job, Depends(get_job)]
