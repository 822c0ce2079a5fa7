"""A Python client of the job service (docs/api.md). It needs only httpx, so a pipeline step can
use it without torch or the web stack:

    from app.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as baerase:
        job = baerase.submit("model.pt", "clean.npz", {"seed": 0})
        job = baerase.wait(job.id, on_progress=lambda job: print(job.progress))
        if job.status == "succeeded":
            baerase.download(job.id, "out/")   # model, report.json, triggers/*.png

Connection errors and 503 answers are retried with exponential backoff; any other error answer
raises an ``ApiError`` subclass that carries the server's problem detail.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from urllib.parse import unquote

import httpx

DEFAULT_SERVER = "http://127.0.0.1:8000"
FINISHED = ("succeeded", "failed", "cancelled")
# A server asking for a longer pause before a retry is not waited for longer than this.
MAX_RETRY_AFTER_S = 30.0
# How long ``wait`` waits unless told otherwise: longer than a job takes on a CPU worker.
DEFAULT_WAIT_S = 6 * 3600.0


class BaeraseError(Exception):
    """Anything the client reports."""


class Unreachable(BaeraseError):
    """No answer from the server (connection refused, timed out), or 503 Service Unavailable,
    even after the retries."""


class ApiError(BaeraseError):
    """The server answered with an error; ``problem`` is its RFC 9457 problem detail."""

    def __init__(self, status: int, problem: dict):
        self.status, self.problem = status, problem
        self.detail: str = problem.get("detail") or problem.get("title") or f"HTTP {status}"
        super().__init__(f"{status} {problem.get('title', '')}: {self.detail}".replace(" :", ":"))


class InvalidRequest(ApiError):
    """400, 413, 415, 422: the files, config or parameters cannot be accepted as they are."""


class Unauthorized(ApiError):
    """401: no API key, or one the server does not know."""


class NotFound(ApiError):
    """404: no such job for this API key's tenant (or no such path)."""


class Conflict(ApiError):
    """409: not possible in the job's current state (say, the model of an unfinished job)."""


class ServerError(ApiError):
    """5xx other than 503: the server failed."""


class WaitTimeout(BaeraseError):
    """``wait`` gave up before the job finished; ``job`` is how it was last seen."""

    def __init__(self, job: JobView, timeout: float):
        self.job = job
        super().__init__(f"job {job.id} is still {job.status} after {timeout:g} s")


class IntegrityError(BaeraseError):
    """A download does not match the SHA-256 the server announced for it."""


ERRORS_BY_STATUS = {401: Unauthorized, 404: NotFound, 409: Conflict}


@dataclass(frozen=True)
class Progress:
    stage: str | None  # validate | recovery | unlearning | report
    fraction: float  # overall, in [0, 1]
    message: str | None


@dataclass(frozen=True)
class JobView:
    """A job as the API answers it (the service's app/core/job_views.py JobView)."""

    id: str
    status: str  # queued | running | succeeded | failed | cancelled
    progress: Progress
    cancel_requested: bool
    error: dict | None  # {"code": "invalid_input" | "internal_error", "message": ...}
    result: dict | None  # backdoor_detected, detected_targets, clean_accuracy, recovered_asr, timings
    created_at: str
    finished_at: str | None
    data: dict  # the whole JSON answer (inputs, config, links, ...)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @classmethod
    def from_json(cls, data: dict) -> JobView:
        return cls(id=data["id"], status=data["status"], progress=Progress(**data["progress"]),
                   cancel_requested=data["cancel_requested"], error=data["error"],
                   result=data["result"], created_at=data["created_at"],
                   finished_at=data["finished_at"], data=data)


@dataclass(frozen=True)
class Trigger:
    class_index: int  # the class the trigger flips inputs to
    family: str  # patch | mask
    score: float | None  # the class's detection score (higher: more suspicious)
    images: dict[str, str]  # picture kind (mask, pattern, stamped) -> URL path of the PNG


class Client:
    def __init__(self, server: str | None = None, api_key: str | None = None, *,
                 retries: int = 4, backoff_s: float = 0.5, timeout_s: float = 60.0):
        """``server`` and ``api_key`` default to $BAERASE_SERVER and $BAERASE_API_KEY. A failed
        connection or a 503 is tried ``retries`` more times, waiting ``backoff_s``, then twice
        as long each time (or what the server's Retry-After asks)."""
        server = server or os.environ.get("BAERASE_SERVER") or DEFAULT_SERVER
        api_key = api_key or os.environ.get("BAERASE_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.server, self.retries, self.backoff_s = server.rstrip("/"), retries, backoff_s
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout_s)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # -- jobs ------------------------------------------------------------------------------

    def submit(self, model: str | Path | None = None, samples: str | Path | None = None,
               config: dict | None = None, *, model_url: str | None = None, samples_url: str | None = None,
               idempotency_key: str | None = None) -> JobView:
        """Uploads a model and clean samples (paths), or has the server fetch either from a URL
        instead (``model_url``, ``samples_url``: https://, e.g. presigned, or s3:// and gs://
        where the operator allows); ``config`` holds the settings of docs/config.md and
        optionally ``webhook_url``. A retried upload carries the same Idempotency-Key, so it
        cannot queue the job twice."""
        for name, path, url in (("model", model, model_url), ("samples", samples, samples_url)):
            if (path is None) == (url is None):
                raise ValueError(f"give either {name} (a file) or {name}_url, not {'both' if url else 'neither'}")
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        data = {"config": json.dumps(config)} if config is not None else None
        # As parts without a file name: the form stays multipart/form-data even with no file.
        urls = {f"{name}_url": (None, url) for name, url in (("model", model_url), ("samples", samples_url)) if url}
        paths = {name: Path(path) for name, path in (("model", model), ("samples", samples)) if path is not None}

        def send() -> httpx.Response:
            # Opened per attempt: a retry must upload the files from their first byte.
            with ExitStack() as stack:
                files = {name: (path.name, stack.enter_context(path.open("rb")), "application/octet-stream")
                         for name, path in paths.items()}
                return self.http.post("/jobs", headers=headers, data=data, files=files | urls)

        return JobView.from_json(self.request(send).json())

    def get(self, job_id: str) -> JobView:
        return JobView.from_json(self.request(lambda: self.http.get(f"/jobs/{job_id}")).json())

    def list(self, status: str | None = None, limit: int | None = None) -> list[JobView]:
        """Your jobs, newest first (all, or the first ``limit``), optionally only those with
        this ``status``."""
        return list(islice(self.iter_jobs(status), limit))

    def iter_jobs(self, status: str | None = None) -> Iterator[JobView]:
        """Your jobs, newest first, fetched a page at a time as the iteration goes."""
        params = {"page_size": 100} | ({"status": status} if status else {})
        while True:
            page = self.request(lambda: self.http.get("/jobs", params=params)).json()
            yield from (JobView.from_json(job) for job in page["jobs"])
            if not page["next_page_token"]:
                return
            params["page_token"] = page["next_page_token"]

    def wait(self, job_id: str, timeout: float | None = DEFAULT_WAIT_S,
             on_progress: Callable[[JobView], None] | None = None, poll_interval_s: float | None = None) -> JobView:
        """Polls until the job has finished and returns it, whatever its status. Calls
        ``on_progress(job)`` after each poll; raises ``WaitTimeout`` after ``timeout`` seconds
        (6 hours by default; None waits for ever). Polls as often as the server's Retry-After
        suggests, unless ``poll_interval_s`` is given."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            response = self.request(lambda: self.http.get(f"/jobs/{job_id}"))
            job = JobView.from_json(response.json())
            if on_progress:
                on_progress(job)
            if job.finished:
                return job
            pause = poll_interval_s if poll_interval_s is not None else retry_after(response, default=2.0)
            if deadline is not None:
                if time.monotonic() >= deadline:
                    raise WaitTimeout(job, timeout)
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)

    def cancel(self, job_id: str) -> JobView:
        """Cancels a queued job at once; a running one stops at the worker's next check."""
        return JobView.from_json(self.request(lambda: self.http.post(f"/jobs/{job_id}/cancel")).json())

    def delete(self, job_id: str) -> None:
        self.request(lambda: self.http.delete(f"/jobs/{job_id}"))

    # -- results of a succeeded job -----------------------------------------------------------

    def download_model(self, job_id: str, path: str | Path) -> Path:
        """Streams the sanitized model to ``path`` (into it, under the server's file name, if
        it is a directory), checks its SHA-256, and returns where it went."""
        path = Path(path)

        def send() -> httpx.Response:
            response = self.http.send(self.http.build_request("GET", f"/jobs/{job_id}/model"), stream=True)
            if response.is_error:
                response.read()  # the problem detail, for the error
            return response

        response = self.request(send)
        target = path / attachment_name(response, default=f"{job_id}.model") if path.is_dir() else path
        partial = target.with_name(target.name + ".partial")
        digest = hashlib.sha256()
        try:
            with partial.open("wb") as out:
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    out.write(chunk)
        except httpx.TransportError as e:
            partial.unlink(missing_ok=True)
            raise Unreachable(f"the download of job {job_id}'s model broke off ({e}); try again") from e
        finally:
            response.close()
        announced = response.headers.get("repr-digest", "").removeprefix("sha-256=:").removesuffix(":")
        if announced and base64.b64decode(announced) != digest.digest():
            partial.unlink()
            raise IntegrityError(f"the model of job {job_id} arrived damaged (SHA-256 differs); download it again")
        return partial.replace(target)

    def triggers(self, job_id: str) -> list[Trigger]:
        """The recovered triggers of the detected targets, one per class and family."""
        answer = self.request(lambda: self.http.get(f"/jobs/{job_id}/triggers")).json()
        return [Trigger(class_index=t["class"], family=t["family"], score=t["score"], images=t["images"])
                for t in answer["triggers"]]

    def trigger_image(self, url: str) -> bytes:
        """The PNG at one of a ``Trigger``'s image URLs."""
        return self.request(lambda: self.http.get(url)).content

    def report(self, job_id: str) -> dict:
        """The whole report.json of the run (per-class scores, metrics, warnings, ...)."""
        return self.request(lambda: self.http.get(f"/jobs/{job_id}/report")).json()

    def download(self, job_id: str, directory: str | Path) -> list[Path]:
        """Writes what `baerase sanitize` would: the sanitized model (under the server's name),
        report.json and triggers/*.png, into ``directory``; returns the files."""
        directory = Path(directory)
        (directory / "triggers").mkdir(parents=True, exist_ok=True)
        files = [self.download_model(job_id, directory), directory / "report.json"]
        files[1].write_text(json.dumps(self.report(job_id), indent=2))
        for trigger in self.triggers(job_id):
            for url in trigger.images.values():
                png = directory / "triggers" / url.rsplit("/", 1)[1]
                png.write_bytes(self.trigger_image(url))
                files.append(png)
        return files

    # -- transport ----------------------------------------------------------------------------

    def request(self, send: Callable[[], httpx.Response]) -> httpx.Response:
        """Calls ``send`` until it gets an answer other than 503, at most 1 + retries times;
        raises the typed error of an error answer."""
        attempt = 0
        while True:
            pause = self.backoff_s * 2**attempt
            try:
                response = send()
            except httpx.TransportError as e:
                failure = Unreachable(f"cannot reach the BAERASE server at {self.server} "
                                      f"({type(e).__name__}: {e}); is it running?")
                failure.__cause__ = e
            else:
                if response.status_code != 503:
                    raise_for_problem(response)
                    return response
                response.close()
                detail = problem_of(response).get("detail") or "503 Service Unavailable"
                failure = Unreachable(f"the BAERASE server at {self.server} is unavailable: {detail}")
                pause = min(max(pause, retry_after(response, default=pause)), MAX_RETRY_AFTER_S)
            if attempt == self.retries:
                raise failure
            time.sleep(pause)
            attempt += 1


def problem_of(response: httpx.Response) -> dict:
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):  # not a problem+json answer (a proxy's error page, say)
        problem = {"status": response.status_code, "detail": response.text.strip()[:300] or None}
    return problem


def raise_for_problem(response: httpx.Response) -> None:
    if not response.is_error:
        return
    status = response.status_code
    error = ERRORS_BY_STATUS.get(status) or (ServerError if status >= 500 else InvalidRequest)
    raise error(status, problem_of(response))


def retry_after(response: httpx.Response, default: float) -> float:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return default


def attachment_name(response: httpx.Response, default: str) -> str:
    """The file name of a Content-Disposition: attachment answer (the exact UTF-8 one where
    given), without any directory part."""
    disposition = response.headers.get("content-disposition", "")
    if encoded := re.search(r"filename\*=UTF-8''([^;\s]+)", disposition, re.IGNORECASE):
        name = unquote(encoded.group(1))
    elif plain := re.search(r'filename="([^"]*)"', disposition, re.IGNORECASE):
        name = plain.group(1)
    else:
        name = ""
    return Path(name).name or default
