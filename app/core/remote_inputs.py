"""Job inputs by URL: POST /jobs may name the model or the samples with ``model_url`` /
``samples_url`` instead of uploading them. ``fetch_input`` streams the file into a staged file of
the artifact store, within the upload's size limit and ``input_url_timeout_s``; the API then
checks its bytes exactly as it checks an upload's (app/api/uploads.py).

Each URL scheme has a fetcher in ``FETCHERS``; a fetcher writes the file to the ``Sink`` it is
given and says what the file is called and where it came from:

- ``https://`` (and ``http://``), such as a presigned S3 or GCS URL: the host must resolve to
  public addresses, or be allowed by ``input_url_allowed_hosts``, by the webhooks' rules
  (app/core/webhook_urls.py), and the request goes to the addresses checked. Redirects are not
  followed: one could point anywhere.
- ``s3://`` and ``gs://`` through fsspec (s3fs; gcsfs if installed), read with the service's own
  credentials: so only from the buckets the operator lists in ``input_buckets``, and never from
  the artifact store, which holds other tenants' files.
- ``models:/`` and ``runs:/``: MLflow model URIs on the operator's tracking server
  (app/core/mlflow_models.py).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import httpx

from app.core.config import Settings
from app.core.storage import CHUNK_BYTES, StagedFile, s3_filesystem
from app.core.webhook_urls import UnsafeUrl, check_addresses, parse_http_url, send_checked


class RemoteInputError(ValueError):
    """The URL cannot be used; the message says why and what to do. ``status``: the HTTP status
    the API answers with (413 for a file over the size limit, else 422)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class FetchedInput:
    filename: str  # the file's name (the URL's last path segment), for messages and the job view
    source: str  # where it came from, without credentials or query string: jobs.model_source


class Sink:
    """Where a fetcher writes the file: the staged file, with the size limit and the deadline
    checked at every chunk."""

    def __init__(self, staged: StagedFile, limit: int, timeout_s: float, url: str):
        self.staged, self.limit, self.timeout_s = staged, limit, timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.what = public_source(url)

    def expect(self, size: int | None) -> None:
        """Refuses at once a file whose announced size is over the limit."""
        if size is not None and size > self.limit:
            raise TooLarge(self.what, size, self.limit)

    def write(self, chunk: bytes) -> None:
        if self.staged.size + len(chunk) > self.limit:
            raise TooLarge(self.what, None, self.limit)
        self.check_deadline()
        self.staged.write(chunk)

    def copy(self, file: BinaryIO) -> None:
        while chunk := file.read(CHUNK_BYTES):
            self.write(chunk)

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise RemoteInputError(f"fetching {self.what} took longer than {self.timeout_s:g} s "
                                   "(BAERASE_INPUT_URL_TIMEOUT_S); upload the file instead, or ask "
                                   "the operator to raise the limit")


class TooLarge(RemoteInputError):
    """Over the size limit (the API words it as it words an upload's)."""

    def __init__(self, what: str, size: int | None, limit: int):
        super().__init__(f"{what} is larger than the limit of {limit} bytes"
                         + (f" ({size} bytes)" if size is not None else ""), status=413)


Fetcher = Callable[[str, Sink, Settings], FetchedInput]


def fetch_input(url: str, staged: StagedFile, limit: int, settings: Settings) -> FetchedInput:
    """Fetches ``url`` into ``staged`` (at most ``limit`` bytes); raises RemoteInputError. The
    caller discards ``staged`` on failure."""
    scheme = urlsplit(url).scheme.lower()
    fetcher = FETCHERS.get(scheme)
    if fetcher is None:
        what = f"{scheme}:// URLs" if scheme else "a URL without a scheme"
        # MLflow's URIs are written models:/NAME/..., the others scheme://HOST/...
        forms = ", ".join(f"{s}:/" if s in ("models", "runs") else f"{s}://" for s in FETCHERS)
        raise RemoteInputError(f"cannot fetch {what}; use one of {forms}, or upload the file")
    try:
        return fetcher(url, Sink(staged, limit, settings.input_url_timeout_s, url), settings)
    finally:
        staged.close()


def fetch_http(url: str, sink: Sink, settings: Settings) -> FetchedInput:
    try:
        target = check_addresses(parse_http_url(url), settings.input_url_allowed_hosts,
                                 "BAERASE_INPUT_URL_ALLOWED_HOSTS")
    except UnsafeUrl as e:
        raise RemoteInputError(f"{sink.what} cannot be fetched: {e}") from None
    timeout = httpx.Timeout(min(60.0, settings.input_url_timeout_s))  # per connect and read
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            # The file's own bytes: a compressed answer could expand without bound.
            response = send_checked(client, target, "GET", stream=True, headers={"accept-encoding": "identity"})
            try:
                copy_answer(response, sink)
            finally:
                response.close()
    except httpx.HTTPError as e:
        raise RemoteInputError(f"cannot fetch {sink.what} ({type(e).__name__}: {e})") from None
    return FetchedInput(file_name(url), sink.what)


def copy_answer(response: httpx.Response, sink: Sink) -> None:
    if response.is_redirect:
        raise RemoteInputError(f"{sink.what} answered with a redirect to "
                               f"{public_source(response.headers.get('location', '?'))}; give the final "
                               "URL (redirects are not followed)")
    if not response.is_success:
        raise RemoteInputError(f"{sink.what} answered {response.status_code} {response.reason_phrase}; "
                               "check the URL (a presigned one may have expired)")
    length = response.headers.get("content-length")
    sink.expect(int(length) if length and length.isdigit() else None)
    for chunk in response.iter_raw(CHUNK_BYTES):
        sink.write(chunk)


def fetch_from_bucket(url: str, sink: Sink, settings: Settings) -> FetchedInput:
    """s3:// or gs://, with the service's credentials, from the buckets the operator allows."""
    import fsspec

    parts = urlsplit(url)
    bucket = f"{parts.scheme.lower()}://{parts.netloc}"
    if bucket not in settings.input_buckets:
        raise RemoteInputError(f"{sink.what} is in {bucket}, which this service does not read from "
                               "(the operator lists the buckets it may read in BAERASE_INPUT_BUCKETS); "
                               "send a presigned https:// URL instead, or upload the file")
    segments = [segment for segment in parts.path.split("/") if segment]
    if not segments or {".", ".."} & set(segments):
        raise RemoteInputError(f"{sink.what} does not name an object: give {bucket}/PATH/TO/FILE")
    key = "/".join(segments)
    store = (settings.artifact_store_url or "").rstrip("/")
    if store and f"{bucket}/{key}".startswith(f"{store}/"):
        raise RemoteInputError(f"{sink.what} is inside the service's artifact store; name your own file")
    if parts.scheme.lower() == "s3":
        filesystem = s3_filesystem(settings.s3_endpoint_url)
    else:
        try:
            filesystem = fsspec.filesystem("gcs")
        except ImportError:
            raise RemoteInputError("gs:// URLs need gcsfs on the API's host (pip install gcsfs); "
                                   "ask the operator, or send a presigned https:// URL") from None
    path = f"{parts.netloc}/{key}"
    try:
        sink.expect(filesystem.info(path).get("size"))
        with filesystem.open(path, "rb", block_size=CHUNK_BYTES) as file:
            sink.copy(file)
    except FileNotFoundError:
        raise RemoteInputError(f"{sink.what} does not exist; check the bucket and key") from None
    except PermissionError:
        raise RemoteInputError(f"the service may not read {sink.what}; ask the bucket's owner to let "
                               "the service's credentials read it") from None
    except OSError as e:  # what fsspec raises for the store's other errors
        raise RemoteInputError(f"cannot fetch {sink.what} ({type(e).__name__}: {e})") from None
    return FetchedInput(file_name(url), sink.what)


def fetch_from_mlflow(url: str, sink: Sink, settings: Settings) -> FetchedInput:
    # Imported here: that module imports this one.
    from app.core.mlflow_models import fetch_model

    return fetch_model(url, sink, settings)


FETCHERS: dict[str, Fetcher] = {"https": fetch_http, "http": fetch_http,
                                "s3": fetch_from_bucket, "gs": fetch_from_bucket,
                                "models": fetch_from_mlflow, "runs": fetch_from_mlflow}


def public_source(url: str) -> str:
    """The URL without user:password@, query string or fragment: a presigned URL's signature
    lives in its query string, and this is stored, logged and shown back."""
    parts = urlsplit(url)
    if parts.scheme and not parts.netloc:  # models:/NAME/VERSION, runs:/RUN_ID/PATH
        return f"{parts.scheme}:{parts.path}"
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else parts.path


def file_name(url: str) -> str:
    """The last segment of the URL's path ('' if it has none, or one with control characters,
    which could not even be stored)."""
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    return "" if any(ord(c) < 32 or ord(c) == 127 for c in name) else name
