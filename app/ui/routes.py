"""The /ui pages and the server-rendered fragments their script fetches (see app/ui/__init__.py)."""

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from app.api.deps import CurrentTenant, JobDep, SessionsDep
from app.api.job_queries import canonical_uuid, list_jobs
from app.api.problems import Problem
from app.api.routes.jobs import RETRY_AFTER_S
from app.api.schemas import trigger_views
from app.core.job_views import job_view
from app.core.models import Job, JobStatus, TriggerImage
from app.ui.chart import score_chart

HERE = Path(__file__).parent
STATIC_TYPES = {"ui.js": "text/javascript", "ui.css": "text/css"}
# The job list shows this many of the newest jobs; `baerase jobs` and GET /jobs page through all.
LIST_SIZE = 50
# Everything comes from this server; trigger pictures arrive as blob: URLs made by ui.js.
CSP = ("default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["percent"] = lambda value: "–" if value is None else f"{value:.1%}"
templates.env.filters["when"] = lambda value: value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "–"


def page(request: Request, title: str, fragment_url: str) -> HTMLResponse:
    return templates.TemplateResponse(request, "page.html", {"title": title, "fragment_url": fragment_url},
                                      headers={"Content-Security-Policy": CSP})


@router.get("")
def jobs_page(request: Request) -> HTMLResponse:
    return page(request, "Jobs", "/ui/fragments/jobs")


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str) -> HTMLResponse:
    if canonical_uuid(job_id) is None:  # a job has one URL, as in the API
        raise Problem(404, f"there is no job {job_id}")
    return page(request, f"Job {job_id}", f"/ui/fragments/jobs/{job_id}")


@router.get("/fragments/jobs")
def jobs_fragment(request: Request, sessions: SessionsDep, tenant: CurrentTenant) -> HTMLResponse:
    with sessions() as session:  # views too: a view may read the job's deferred columns
        jobs, more = list_jobs(session, tenant, None, LIST_SIZE, None)
        views = [job_view(job) for job in jobs]
    # The list refreshes itself for as long as it is open: new jobs may arrive from anywhere.
    return templates.TemplateResponse(request, "jobs.html", {
        "jobs": views, "more": more is not None, "tenant": tenant.name,
    }, headers={"Retry-After": str(RETRY_AFTER_S)})


@router.get("/fragments/jobs/{job_id}")
def job_fragment(request: Request, job: JobDep, sessions: SessionsDep) -> HTMLResponse:
    with sessions() as session:
        session.add(job)  # attached again (JobDep's session is closed): a view may read deferred columns
        context = {"job": job_view(job)}
    if job.status == JobStatus.succeeded:
        with sessions() as session:
            report = session.scalar(select(Job.report).where(Job.id == job.id))
            images = list(session.scalars(
                select(TriggerImage).where(TriggerImage.job_id == job.id)
                .order_by(TriggerImage.class_index, TriggerImage.family, TriggerImage.kind)))
        report = with_scores(report)
        asr_threshold = report["config"]["unlearning"]["asr_threshold"]
        context |= {
            "report": report,
            # The targets whose recovered trigger unlearning did not bring down to the threshold.
            "not_erased": [target for target, asr in report["recovered_asr"].items()
                           if asr["after"] > asr_threshold],
            "asr_threshold": asr_threshold,
            "chart": score_chart(report["class_scores"], report["flag_score"],
                                 report["config"]["class_names"]),
            "triggers": trigger_views(job.id, images),
        }
    headers = {} if job.status.finished else {"Retry-After": str(RETRY_AFTER_S)}
    return templates.TemplateResponse(request, "job.html", context, headers=headers)


def with_scores(report: dict) -> dict:
    """Reports stored before detection scores (no reference model) have log ratios only: their
    page shows each log ratio as the score, so an older job's page still opens."""
    if "flag_score" in report:
        return report
    return report | {
        "flag_score": report["flag_log_ratio"],
        "class_scores": [{"score": s["log_ratio"], "transfer_asr": None} | s for s in report["class_scores"]],
    }


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    if name not in STATIC_TYPES:
        raise Problem(404, f"there is no /ui/static/{name}")
    return FileResponse(HERE / "static" / name, media_type=STATIC_TYPES[name])

