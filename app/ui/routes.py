"""The /ui pages and the server-rendered fragments their script fetches (see app/ui/__init__.py)."""

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.templating import Jinja2Templates

from app.api.deps import CurrentTenant, JobDep, SessionsDep
from app.api.job_queries import canonical_uuid, list_jobs
from app.api.problems import Problem
from app.api.routes.jobs import RETRY_AFTER_S
from app.core.job_views import job_report, job_view, trigger_views
from app.core.models import JobStatus
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


def page(request: Request, title: str, fragment_url: str, submit_form: bool = False) -> HTMLResponse:
    return templates.TemplateResponse(request, "page.html", {"title": title, "fragment_url": fragment_url,
                                                             "submit_form": submit_form},
                                      headers={"Content-Security-Policy": CSP})


@router.get("")
def jobs_page(request: Request) -> HTMLResponse:
    return page(request, "Jobs", "/ui/fragments/jobs", submit_form=True)


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
        report = job_report(job) if job.status == JobStatus.succeeded else None
    if report is not None:
        context |= {
            "report": report,
            "not_erased": report.not_erased(),
            "chart": score_chart([score.model_dump(by_alias=True) for score in report.class_scores],
                                 report.flag_score, report.class_names),
            "triggers": trigger_views(job.id, report),
        }
    headers = {} if job.status.finished else {"Retry-After": str(RETRY_AFTER_S)}
    return templates.TemplateResponse(request, "job.html", context, headers=headers)


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    if name not in STATIC_TYPES:
        raise Problem(404, f"there is no /ui/static/{name}")
    return FileResponse(HERE / "static" / name, media_type=STATIC_TYPES[name])

