"""The `/jobs` routes: submit, list, read (with a short cache for pollers), cancel, delete, and a
succeeded job's model, triggers and report. docs/api.md documents them."""

import asyncio
import base64
from collections.abc import Callable
from typing import Annotated, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api import job_queries, submission
from app.api.deps import CurrentTenant, JobDep, SessionsDep, SettingsDep, StoreDep, TTLCache
from app.api.openapi import problem_answer, schema_ref
from app.api.problems import Problem
from app.api.schemas import JobPage, TriggerList
from app.api.submission import JobOptions
from app.api.uploads import receive_job_form
from app.core import lifecycle
from app.core.db import Sessions
from app.core.job_views import JobView, job_path, job_report, job_view, trigger_views
from app.core.models import ArtifactRole, Job, JobStatus, Tenant
from app.core.storage import read_chunks
from worker.sanitize.report import Report

router = APIRouter(prefix="/jobs", tags=["jobs"])
T = TypeVar("T")

# Suggested wait between polls of a job that is not finished yet.
RETRY_AFTER_S = 2

PROBLEM = problem_answer("problem details; detail says what to fix")
UPLOAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object",
    "properties": {
        "model": {"type": "string", "format": "binary", "description":
                  "TorchScript archive, torch.save'd state_dict (.pt/.pth) or .safetensors"},
        "samples": {"type": "string", "format": "binary", "description":
                    ".npz with arrays x and y, or .zip of class folders of PNG/JPEG images"},
        "model_url": {"type": "string", "description": "instead of model: where the service fetches "
                      "it (https://, e.g. presigned; s3:// or gs:// from buckets the operator allows; "
                      "models:/NAME/VERSION or runs:/RUN_ID/PATH on the operator's MLflow server)"},
        "samples_url": {"type": "string", "description": "instead of samples: where the service fetches them"},
        "config": {**schema_ref(JobOptions), "description":
                   'a JSON object: the settings of docs/config.md plus webhook_url, e.g. {"seed": 0}'},
    },
    # Each input as a file or by URL.
    "allOf": [{"anyOf": [{"required": [name]}, {"required": [f"{name}_url"]}]} for name in ("model", "samples")],
}, "encoding": {"config": {"contentType": "application/json"}}}}}}


@router.post("", status_code=202, summary="Submit a model and clean samples for sanitization",
             openapi_extra=UPLOAD_FORM,
             responses={code: PROBLEM for code in (400, 401, 413, 415, 422, 429)})
async def create_job(
    request: Request, response: Response, sessions: SessionsDep, tenant: CurrentTenant,
    settings: SettingsDep, store: StoreDep,
    idempotency_key: Annotated[str | None, Header(max_length=255, description=
                               "retrying with the same key returns the first job")] = None,
) -> JobView:
    if idempotency_key is None:
        # Refused before the upload, which would be wasted. Not for a retry with a key: its job
        # may be one of those counted, and the answer is that job.
        await run_in_threadpool(in_session, sessions, submission.check_active_jobs, tenant,
                                settings.max_active_jobs_per_tenant)
    form = await receive_job_form(request, store, settings)
    try:
        view, replayed = await run_in_threadpool(in_session, sessions, submit_and_view, store, tenant,
                                                 form, idempotency_key, settings)
    finally:
        form.discard()
    # After the commit, so a worker never gets a message for a job it cannot see yet. If this
    # fails the job still stands, not announced: a sweeper sends its message at its next round.
    if not replayed and (queue := request.app.state.job_queue):
        if await run_in_threadpool(queue.announce, view.id):
            await run_in_threadpool(lifecycle.mark_announced, sessions, view.id)
    response.headers["Location"] = job_path(view.id)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return view


def submit_and_view(session: Session, *args) -> tuple[JobView, bool]:
    """submission.submit_job, and the job's view made in the same session (a replayed job may have
    finished, and a view may read the job's deferred columns)."""
    job, replayed = submission.submit_job(session, *args)
    return job_view(job), replayed


@router.get("", summary="Your jobs, newest first", responses={401: PROBLEM, 422: PROBLEM})
def list_jobs(
    sessions: SessionsDep, tenant: CurrentTenant,
    status: JobStatus | None = None,
    page_size: Annotated[int, Query(ge=1, le=100)] = 20,
    page_token: str | None = None,
) -> JobPage:
    with sessions() as session:  # views too: a view may read the job's deferred columns
        jobs, next_token = job_queries.list_jobs(session, tenant, status, page_size, page_token)
        return JobPage(jobs=[job_view(job) for job in jobs], next_page_token=next_token)


@router.get("/{job_id}", summary="A job's status, progress and result", response_model=JobView,
            responses={401: PROBLEM, 404: PROBLEM})
async def read_job(job_id: str, request: Request, sessions: SessionsDep, tenant: CurrentTenant) -> Response:
    # What clients poll, often many at once: a job read from the database is served again, as
    # the same JSON, for BAERASE_STATUS_CACHE_S (the worker writes progress at most once a second
    # anyway), and the polls that arrive while it is read wait for that one read. This process's
    # own cancel and delete drop it at once.
    recent: TTLCache[str, tuple[int, asyncio.Future[tuple[bytes, bool]]]] = request.app.state.recent_views
    tenant_id, reading = recent.get(job_id) or (None, None)
    if tenant_id != tenant.id:
        reading = asyncio.ensure_future(run_in_threadpool(in_session, sessions, read_view, tenant, job_id))
        recent.put(job_id, (tenant.id, reading))
    body, finished = await asyncio.shield(reading)  # a client that leaves cancels no one's read
    return Response(body, media_type="application/json",
                    headers=None if finished else {"Retry-After": str(RETRY_AFTER_S)})


def read_view(session: Session, tenant: Tenant, job_id: str) -> tuple[bytes, bool]:
    """The job as GET /jobs/{id} answers it (JSON), and whether it has finished."""
    view = job_view(job_queries.find_job(session, tenant, job_id))
    return view.model_dump_json().encode(), view.status.finished


@router.post("/{job_id}/cancel", status_code=202, summary="Cancel a job (best effort)",
             responses={401: PROBLEM, 404: PROBLEM, 409: PROBLEM})
def cancel_job(job: JobDep, sessions: SessionsDep, request: Request) -> JobView:
    with sessions() as session:
        job = lifecycle.cancel_job(session, job.id)
        if job.status in (JobStatus.succeeded, JobStatus.failed):
            raise Problem(409, f"the job has already {job.status.value}; there is nothing to cancel")
        view = job_view(job)
    request.app.state.recent_views.pop(str(job.id))
    return view


@router.delete("/{job_id}", status_code=204, summary="Delete a job, its files and results",
               responses={401: PROBLEM, 404: PROBLEM, 409: PROBLEM})
def delete_job(job: JobDep, sessions: SessionsDep, store: StoreDep, request: Request) -> Response:
    with sessions() as session:
        if not lifecycle.delete_job(session, store, job.id):
            raise Problem(409, f"job {job.id} is running; cancel it (POST /jobs/{job.id}/cancel) and "
                               "delete it once it has stopped")
    request.app.state.recent_views.pop(str(job.id))
    return Response(status_code=204)


@router.get("/{job_id}/model", summary="Download the sanitized model (in the input's format)",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}},
                       401: PROBLEM, 404: PROBLEM, 409: PROBLEM, 410: PROBLEM})
def download_model(job: JobDep, store: StoreDep) -> StreamingResponse:
    require_files(job, "the sanitized model")
    sanitized = job.artifact(ArtifactRole.sanitized_model)
    digest = base64.b64encode(bytes.fromhex(sanitized.sha256)).decode()
    return StreamingResponse(read_chunks(store.open(sanitized.key)), media_type="application/octet-stream",
                             headers={"Content-Disposition": attachment(sanitized.filename),
                                      "Content-Length": str(sanitized.size),
                                      "Repr-Digest": f"sha-256=:{digest}:"})


@router.get("/{job_id}/triggers", summary="The recovered triggers of the detected targets",
            responses={401: PROBLEM, 404: PROBLEM, 409: PROBLEM, 410: PROBLEM})
def list_triggers(job: JobDep, sessions: SessionsDep) -> TriggerList:
    require_files(job, "the recovered triggers")
    return TriggerList(triggers=trigger_views(job.id, stored_report(sessions, job)))


@router.get("/{job_id}/triggers/{trigger_id}.png", summary="One trigger picture",
            response_class=Response,
            responses={200: {"content": {"image/png": {}}}, 401: PROBLEM, 404: PROBLEM, 410: PROBLEM})
def trigger_png(job: JobDep, trigger_id: str, sessions: SessionsDep, store: StoreDep) -> Response:
    require_unexpired(job, "its trigger pictures")
    report = stored_report(sessions, job) if job.status == JobStatus.succeeded else None
    if report is None or all(trigger.name != trigger_id for trigger in report.triggers):
        raise Problem(404, f"job {job.id} has no trigger picture {trigger_id!r}; "
                           f"GET {job_path(job.id)}/triggers lists them")
    with store.open(lifecycle.trigger_key(job.id, trigger_id)) as png:
        return Response(png.read(), media_type="image/png")


@router.get("/{job_id}/report", summary="The full report.json of a succeeded job",
            responses={401: PROBLEM, 404: PROBLEM, 409: PROBLEM})
def read_report(job: JobDep, sessions: SessionsDep) -> JSONResponse:
    require_success(job, "the report")
    with sessions() as session:
        report = session.scalar(select(Job.report).where(Job.id == job.id))
    return JSONResponse(report)


def stored_report(sessions: Sessions, job: Job) -> Report:
    with sessions() as session:
        session.add(job)  # attached again (JobDep's session is closed) to read the deferred report
        return job_report(job)


def in_session(sessions: Sessions, function: Callable[..., T], *args) -> T:
    """function(session, *args) in a session of its own, for run_in_threadpool: the session and
    its connection live only as long as this one call in one thread (see app/api/deps.py)."""
    with sessions() as session:
        return function(session, *args)


def require_success(job: Job, what: str) -> None:
    if job.status == JobStatus.succeeded:
        return
    if job.status.finished:
        reason = f": {job.error_message}" if job.error_message else ""
        raise Problem(409, f"job {job.id} {job.status.value}{reason}; {what} exists only for a "
                           "succeeded job")
    raise Problem(409, f"job {job.id} is {job.status.value}; {what} will be available once it has "
                       f"succeeded (poll {job_path(job.id)})", headers={"Retry-After": str(RETRY_AFTER_S)})


def require_files(job: Job, what: str) -> None:
    require_success(job, what)
    require_unexpired(job, what)


def require_unexpired(job: Job, what: str) -> None:
    """410 Gone once retention has deleted the job's files (BAERASE_ARTIFACT_RETENTION_DAYS)."""
    if job.expired_at is not None:
        raise Problem(410, f"job {job.id}'s files were deleted on {job.expired_at:%Y-%m-%d}, as the "
                           f"service keeps them for a set time after a job finishes; {what} is gone "
                           f"(its report stays at {job_path(job.id)}/report)")


def attachment(filename: str) -> str:
    # RFC 6266: a plain-ASCII fallback plus the exact UTF-8 name.
    fallback = filename.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename)}"
