"""`GET /metrics`: Prometheus text, computed from the database at scrape time (app/core/metrics.py)."""

from fastapi import APIRouter, Request, Response

from app.core.metrics import render

router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics: jobs by status, queue depth, durations, upload bytes",
            response_class=Response, include_in_schema=True)
def metrics(request: Request) -> Response:
    body, content_type = render(request.app.state.metrics)
    return Response(body, media_type=content_type)
