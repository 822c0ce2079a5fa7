"""/openapi.json as the API answers: the ``config`` form field of POST /jobs described by its JSON
schema (JobOptions; app/api/uploads.py reads the form from the stream, so FastAPI never sees the
field), and every error answer as application/problem+json with the ProblemDetails schema, not
FastAPI's HTTPValidationError, which this API never sends (app/api/problems.py)."""

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.api.problems import MEDIA_TYPE, ProblemDetails
from app.api.submission import JobOptions

REF_TEMPLATE = "#/components/schemas/{model}"
# What no route's signature names, but the description refers to.
EXTRA_SCHEMAS = (ProblemDetails, JobOptions)
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def schema_ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF_TEMPLATE.format(model=model.__name__)}


def problem_answer(description: str) -> dict:
    return {"description": description, "content": {MEDIA_TYPE: {"schema": schema_ref(ProblemDetails)}}}


def install_openapi(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:  # made once, on the first request
            describe(generate())
        return app.openapi_schema

    app.openapi = openapi


def describe(document: dict) -> None:
    """Adds the extra schemas, and makes every error answer a problem (in place)."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in FASTAPI_VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    _, extra = models_json_schema([(model, "validation") for model in EXTRA_SCHEMAS], ref_template=REF_TEMPLATE)
    schemas.update(extra["$defs"])
    for operations in document["paths"].values():
        for operation in operations.values():
            for status, answer in operation["responses"].items():
                if status[0] in "45":  # FastAPI's own 422 ("Validation Error") included
                    answer["content"] = problem_answer(answer["description"])["content"]
