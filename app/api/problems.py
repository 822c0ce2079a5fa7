"""Errors as RFC 9457 problem details (application/problem+json). ``type`` stays about:blank, so
``title`` is the HTTP status phrase; ``detail`` says what the caller should fix."""

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException
from starlette.routing import Match

from app.core.db import UNAVAILABLE

MEDIA_TYPE = "application/problem+json"
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# Suggested wait before retrying a request that met an unreachable database.
DATABASE_RETRY_AFTER_S = 5

log = logging.getLogger(__name__)


class FieldProblem(BaseModel):
    loc: str = Field(description="the field, dotted: config.recovery.steps")
    msg: str


class ProblemDetails(BaseModel):
    """The body of every error answer (RFC 9457): problem_response sends it, and /openapi.json
    describes every error answer with it (app/api/openapi.py)."""

    model_config = ConfigDict(extra="allow")  # RFC 9457's extension members

    type: str = "about:blank"
    title: str = Field(description="the HTTP status phrase")
    status: int
    detail: str = Field(description="what to fix, or what went wrong")
    instance: str = Field(description="the path of the request")
    errors: list[FieldProblem] | None = Field(None, description="validation problems: one per field")


class Problem(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None, **extra):
        super().__init__(detail)
        self.status, self.detail, self.headers, self.extra = status, detail, headers, extra


def problem_response(request: Request, status: int, detail: str,
                     headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    body = ProblemDetails(title=HTTPStatus(status).phrase, status=status, detail=detail,
                          instance=request.url.path, **extra)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers,
                        media_type=MEDIA_TYPE)


def describe_validation_errors(errors) -> list[dict]:
    """Pydantic errors as {"loc": "config.recovery.steps", "msg": ...}."""
    return [{"loc": ".".join(str(part) for part in error["loc"]), "msg": error["msg"]}
            for error in errors]


def allowed_methods(request: Request) -> list[str]:
    """Every method some route answers at this path (asked of each route, as routers nest)."""
    return [method for method in HTTP_METHODS
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL
                   for route in request.app.router.routes)]


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem):
        return problem_response(request, exc.status, exc.detail, exc.headers, **exc.extra)

    @app.exception_handler(HTTPException)
    async def on_http_exception(request: Request, exc: HTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).description
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"there is no {request.method} {request.url.path}; see /docs for the API"
        if exc.status_code == 405:
            # Starlette names only the methods of the first route that matched the path.
            allowed = allowed_methods(request)
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
            detail = f"{request.url.path} answers {', '.join(allowed)}, not {request.method}"
        return problem_response(request, exc.status_code, detail, headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        errors = describe_validation_errors(exc.errors())
        detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors)
        return problem_response(request, 422, f"invalid request: {detail}", errors=errors)

    async def on_database_unavailable(request: Request, exc: Exception):
        # Nothing was half-written: each request commits once, at its end, or not at all.
        log.warning("%s %s: the database is unavailable: %s", request.method, request.url.path,
                    str(exc).splitlines()[0])
        return problem_response(request, 503, "the database is unavailable for the moment; retry "
                                "the request later", {"Retry-After": str(DATABASE_RETRY_AFTER_S)})

    for exc_class in (*UNAVAILABLE, PoolTimeout):
        app.add_exception_handler(exc_class, on_database_unavailable)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        # Logged by the server; the caller learns only that it was not their fault.
        return problem_response(request, 500, "an internal error occurred; try again later")
