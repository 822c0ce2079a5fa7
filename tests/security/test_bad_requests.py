"""Bad requests answer 4xx problem+json, never 500, and change nothing: malformed multipart
bodies, configs nested 5,000 deep or holding NaN/Infinity, seeds out of range, job ids in other
spellings, methods a path does not answer; and a refused pickle's message gives no dangerous advice."""

import base64
import json
import uuid

import pytest
import torch

from tests.security.refusals import assert_problem, nothing_stored  # noqa: F401  (a fixture)

BOUNDARY = "bAeRaSe"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def part(headers: str, body: bytes = b"PK\x05\x06" + bytes(18)) -> bytes:
    return f"--{BOUNDARY}\r\n{headers}\r\n\r\n".encode() + body + b"\r\n"


END = f"--{BOUNDARY}--\r\n".encode()
MALFORMED = {
    "no boundary": ("multipart/form-data", part('Content-Disposition: form-data; name="model"') + END),
    "an empty boundary": ("multipart/form-data; boundary=", b"--\r\n"),
    "a boundary of 71 characters": ("multipart/form-data; boundary=" + "b" * 71, b"--" + b"b" * 71 + b"\r\n"),
    "a header without a colon": (MULTIPART, part('Content-Disposition form-data; name="model"') + END),
    "a CR in a filename": (MULTIPART, part('Content-Disposition: form-data; name="model"; filename="a\rb.pt"') + END),
    "a NUL in a filename": (MULTIPART, part('Content-Disposition: form-data; name="model"; filename="a\0b.pt"') + END),
    "an oversized header": (MULTIPART, part('Content-Disposition: form-data; name="model"; filename="'
                                            + "a" * 100_000 + '.pt"') + END),
    "no parts at all": (MULTIPART, b"this is not multipart"),
}


@pytest.mark.usefixtures("nothing_stored")
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_multipart_is_4xx(client, auth, case, caplog):
    content_type, body = MALFORMED[case]
    response = client.post("/jobs", content=body, headers=auth | {"Content-Type": content_type})
    assert 400 <= response.status_code < 500
    assert_problem(response, response.status_code)
    assert "Traceback" not in caplog.text


DEEP = [
    '{"class_names": ' + "[" * 5000 + "]" * 5000 + "}",
    '{"recovery": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}",
    "[" * 60_000,  # within the 64 KiB a config may have
]


@pytest.mark.usefixtures("nothing_stored")
@pytest.mark.parametrize("config", DEEP, ids=["arrays", "objects", "unclosed"])
def test_deeply_nested_config_is_422(submit, config):
    assert_problem(submit(config=config), 422)


NOT_FINITE = [
    '{"mean": [NaN], "std": [1]}',
    '{"mean": [0.5], "std": [Infinity]}',
    '{"mean": [-Infinity], "std": [1]}',
    '{"mean": [0.5], "std": [1e999]}',  # a number too large for a float reads as infinity
    '{"holdout_fraction": NaN}',
    '{"recovery": {"lr": Infinity}}',
    '{"detection": {"min_asr": NaN}}',
    '{"unlearning": {"lr": -Infinity}}',
]


@pytest.mark.usefixtures("nothing_stored")
@pytest.mark.parametrize("config", NOT_FINITE)
def test_nan_and_infinity_are_422_anywhere(submit, config):
    assert_problem(submit(config=config), 422, "config")


@pytest.mark.usefixtures("nothing_stored")
@pytest.mark.parametrize("seed", ["-1", "1e29", str(2**64), "100000000000000000000000000000"])
def test_seeds_out_of_range_are_422(submit, seed):
    assert_problem(submit(config='{"seed": %s}' % seed), 422, "config.seed")


@pytest.mark.usefixtures("nothing_stored")
def test_a_config_the_engine_refuses_is_422_with_each_field(submit):
    body = assert_problem(submit(config={"seed": "zero", "recovery": {"nope": 1}}), 422, "config.seed")
    assert {e["loc"] for e in body["errors"]} == {"config.seed", "config.recovery.nope"}


@pytest.mark.parametrize("token", [[1, 2], ["2026-01-01T00:00:00", 7], "[" * 20_000, "{}", "null"])
def test_forged_page_tokens_are_422(client, auth, token):
    text = token if isinstance(token, str) else json.dumps(token)
    forged = base64.urlsafe_b64encode(text.encode()).decode()
    assert_problem(client.get("/jobs", params={"page_token": forged}, headers=auth), 422, "page_token")


def test_only_canonical_job_ids_name_a_job(client, submit, auth):
    job_id = submit().json()["id"]
    other_spellings = [job_id.upper(), f"urn:uuid:{job_id}", f"{{{job_id}}}", job_id.replace("-", "")]
    for spelling in other_spellings:
        for method, path in (("GET", f"/jobs/{spelling}"), ("POST", f"/jobs/{spelling}/cancel"),
                             ("DELETE", f"/jobs/{spelling}"), ("GET", f"/jobs/{spelling}/webhooks")):
            assert_problem(client.request(method, path, headers=auth), 404)
    job = client.get(f"/jobs/{job_id}", headers=auth).json()
    assert job["status"] == "queued" and not job["cancel_requested"]  # nothing reached the job


def test_405_names_every_method_of_the_path(client, auth):
    job_path = f"/jobs/{uuid.uuid4()}"
    response = client.put(job_path, headers=auth)
    assert_problem(response, 405, "GET", "DELETE")
    assert set(response.headers["allow"].split(", ")) == {"GET", "DELETE"}
    response = client.patch("/jobs", headers=auth)
    assert_problem(response, 405)
    assert set(response.headers["allow"].split(", ")) == {"GET", "POST"}


class Payload:
    def __reduce__(self):
        return (print, ("this pickle ran",))


def test_a_refused_pickle_gives_no_advice_to_load_it_anyway(tmp_path, capsys):
    from worker.sanitize.errors import InputError
    from worker.sanitize.loading import read_state_dict

    path = tmp_path / "evil.pt"
    torch.save({"weight": Payload()}, path)
    with pytest.raises(InputError) as refused:
        read_state_dict(path, "state_dict")
    assert "weights_only" not in str(refused.value) and "pickled objects" in str(refused.value)
    assert "this pickle ran" not in capsys.readouterr().out
