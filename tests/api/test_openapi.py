"""/openapi.json describes what the API really takes and answers: the `config` form field of
POST /jobs by the JSON schema of its options, and every error answer as an RFC 9457 problem
(application/problem+json, the ProblemDetails schema), never FastAPI's HTTPValidationError."""

import json

from app.api.problems import MEDIA_TYPE
from app.api.submission import JobOptions

PROBLEM_REF = {"$ref": "#/components/schemas/ProblemDetails"}


def resolve(document: dict, ref: str) -> dict:
    assert ref.startswith("#/"), ref
    node = document
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def refs_in(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [ref for value in node.values() for ref in refs_in(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in refs_in(value)]
    return []


def test_every_error_answer_is_documented_as_a_problem(client):
    document = client.get("/openapi.json").json()
    assert "ValidationError" not in json.dumps(document)  # nor HTTPValidationError
    errors = [(path, method, status, answer) for path, operations in document["paths"].items()
              for method, operation in operations.items()
              for status, answer in operation["responses"].items() if status[0] in "45"]
    assert len(errors) > 30
    for path, method, status, answer in errors:
        assert answer["content"] == {MEDIA_TYPE: {"schema": PROBLEM_REF}}, (method, path, status)
    assert ("/readyz", "get", "503") in {error[:3] for error in errors}
    for ref in refs_in(document):  # every reference resolves
        resolve(document, ref)


def test_real_problems_fit_the_documented_schema(client, auth, submit):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ProblemDetails"]
    assert set(schema["required"]) == {"title", "status", "detail", "instance"}
    answers = [submit(config={"recovery": {"stepz": 1}}),  # with errors, one per field
               client.get("/jobs/4b8c1a52-8f9a-4d0e-9a55-3d0f7e2a9c11", headers=auth),
               client.get("/jobs?page_size=0", headers=auth),  # FastAPI's own validation
               client.get("/jobs")]
    for answer in answers:
        assert answer.headers["content-type"] == MEDIA_TYPE and answer.status_code >= 400
        problem = answer.json()
        assert set(schema["required"]) <= set(problem) <= set(schema["properties"]), problem
    assert answers[0].json()["errors"] == [{"loc": "config.recovery.stepz", "msg": "Extra inputs are not permitted"}]


def test_the_config_field_is_described_by_the_options_schema(client):
    document = client.get("/openapi.json").json()
    form = document["paths"]["/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]
    config = form["schema"]["properties"]["config"]
    assert config["$ref"] == "#/components/schemas/JobOptions" and "docs/config.md" in config["description"]
    assert form["encoding"]["config"]["contentType"] == "application/json"
    options = resolve(document, config["$ref"])
    assert set(options["properties"]) == set(JobOptions.model_fields)
    assert options["additionalProperties"] is False  # a misspelt option is refused, as documented
    recovery = resolve(document, options["properties"]["recovery"]["$ref"])
    assert recovery["properties"]["screen_steps"]["maximum"] == 5000
    assert options["properties"]["webhook_url"]["anyOf"][0]["format"] == "uri"
