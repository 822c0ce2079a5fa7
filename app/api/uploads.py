"""Receiving a job's files: the multipart body is parsed as it streams in, each file goes chunk by
chunk into a staged file of the artifact store, and the files are then checked by their bytes. A
file named by URL instead (``model_url``, ``samples_url``) is fetched into a staged file by
app/core/remote_inputs.py, within the same size limits, and checked the same way.

The checks look at structure only (magic bytes, zip member names, the safetensors header), by
the rules of worker/sanitize/formats.py, which the worker's loader applies too. No model is ever
deserialized here: loading, with ``weights_only=True``, happens in the worker.
"""

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import anyio
from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.api.problems import Problem
from app.core.config import Settings
from app.core.remote_inputs import RemoteInputError, TooLarge, fetch_input
from app.core.storage import ArtifactStore, StagedFile
from worker.sanitize import formats
from worker.sanitize.errors import InputError
from worker.sanitize.formats import HEAD_BYTES, MODEL_HELP, SAMPLES_HELP, is_zip, may_be_model
from worker.sanitize.sample_sizes import inspect_samples

MAX_CONFIG_BYTES = 64 * 1024
# model_url, samples_url: presigned URLs run to 1-2 KiB.
MAX_URL_BYTES = 8 * 1024
TEXT_LIMITS = {"config": MAX_CONFIG_BYTES, "model_url": MAX_URL_BYTES, "samples_url": MAX_URL_BYTES}
# The headers of one part (Content-Disposition, Content-Type): a few hundred bytes in practice;
# the parser would otherwise buffer a header of any length in memory.
MAX_PART_HEADER_BYTES = 16 * 1024
# RFC 2046, section 5.1.1: 1 to 70 characters from this set.
BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


@dataclass
class FilePart:
    field: str  # model | samples
    staged: StagedFile
    filename: str
    limit: int
    head: bytes = b""


@dataclass
class JobForm:
    model: FilePart | None = None
    samples: FilePart | None = None
    texts: dict[str, bytearray] = field(default_factory=dict)  # config, model_url, samples_url
    model_source: str | None = None  # the URL the model was fetched from, secrets left out

    @property
    def config_text(self) -> bytearray | None:
        return self.texts.get("config")

    def files(self) -> list[FilePart]:
        return [part for part in (self.model, self.samples) if part is not None]

    def discard(self) -> None:
        """Removes every staged file that has not been moved into the store."""
        for part in self.files():
            part.staged.discard()


class JobFormParser:
    """Callbacks for python-multipart: routes each part to a staged file or the config buffer,
    enforcing the size limits and the files' magic bytes as the data arrives."""

    def __init__(self, store: ArtifactStore, max_model_bytes: int, max_samples_bytes: int):
        self.store = store
        self.limits = {"model": max_model_bytes, "samples": max_samples_bytes}
        self.form = JobForm()
        self.headers: dict[bytes, bytes] = {}
        self.header_name = self.header_value = b""
        self.header_bytes = 0
        self.current: FilePart | str | None = None  # the file part, or the text field's name

    def on_part_begin(self) -> None:
        self.headers = {}
        self.header_bytes = 0

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.count_header_bytes(end - start)
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.count_header_bytes(end - start)
        self.header_value += data[start:end]

    def count_header_bytes(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > MAX_PART_HEADER_BYTES:
            raise Problem(400, f"a part of the multipart body has more than "
                               f"{MAX_PART_HEADER_BYTES // 1024} KiB of headers")

    def on_header_end(self) -> None:
        self.headers[self.header_name.lower()] = self.header_value
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name in ("model", "samples"):
            if getattr(self.form, name) is not None:
                raise Problem(422, f"the form has two '{name}' fields; send one")
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            # Stored and shown back: a NUL cannot even be stored in PostgreSQL text.
            if any(ord(c) < 32 or ord(c) == 127 for c in filename):
                raise Problem(422, f"the {name} file's name has control characters; rename it")
            part = FilePart(name, self.store.stage(),
                            PurePosixPath(filename.replace("\\", "/")).name or name, self.limits[name])
            setattr(self.form, name, part)
            self.current = part
        elif name in TEXT_LIMITS:
            if name in self.form.texts:
                raise Problem(422, f"the form has two '{name}' fields; send one")
            self.form.texts[name] = bytearray()
            self.current = name
        else:
            raise Problem(422, f"unexpected form field {name!r}; send model (or model_url), samples "
                               "(or samples_url) and config")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if isinstance(self.current, str):
            text = self.form.texts[self.current]
            if len(text) + len(chunk) > TEXT_LIMITS[self.current]:
                raise Problem(413, f"{self.current} is larger than {TEXT_LIMITS[self.current] // 1024} KiB")
            text += chunk
            return
        part = self.current
        if part.staged.size + len(chunk) > part.limit:
            raise too_large(part.filename, part.field, part.limit)
        if len(part.head) < HEAD_BYTES:
            part.head += chunk[:HEAD_BYTES - len(part.head)]
            if len(part.head) == HEAD_BYTES:
                check_head(part)
        part.staged.write(chunk)

    def on_part_end(self) -> None:
        if isinstance(self.current, FilePart):
            self.current.staged.close()
            if len(self.current.head) < HEAD_BYTES:
                check_head(self.current)
        self.current = None

    def callbacks(self) -> dict:
        return {name: getattr(self, name) for name in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end",
            "on_headers_finished", "on_part_data", "on_part_end")}


async def receive_job_form(request: Request, store: ArtifactStore, settings: Settings) -> JobForm:
    """Streams the multipart body into staged files, and fetches the files it names by URL;
    on any error nothing is left behind."""
    max_model_bytes, max_samples_bytes = settings.max_model_bytes, settings.max_samples_bytes
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not BOUNDARY.fullmatch(options.get(b"boundary", b"")):
        raise Problem(415, "send the job as multipart/form-data (with a boundary of 1 to 70 "
                           "characters, RFC 2046) with the fields model (file) or model_url, samples "
                           "(file) or samples_url, and config (JSON, optional)")
    declared = request.headers.get("content-length")
    limit = max_model_bytes + max_samples_bytes + MAX_CONFIG_BYTES + 64 * 1024  # + multipart framing
    if declared and declared.isdigit() and int(declared) > limit:
        raise Problem(413, f"the request is {format_bytes(int(declared))}; the model may have at "
                           f"most {format_bytes(max_model_bytes)} and the samples at most "
                           f"{format_bytes(max_samples_bytes)}")
    parser = JobFormParser(store, max_model_bytes, max_samples_bytes)
    multipart = MultipartParser(options[b"boundary"], parser.callbacks())
    form = parser.form
    try:
        async for chunk in request.stream():
            # The parser writes file chunks to disk: keep that off the event loop.
            await anyio.to_thread.run_sync(multipart.write, chunk)
        multipart.finalize()
        for part in form.files():
            part.staged.close()
        urls = {name: url_field(form, name) for name in ("model", "samples")}
        check_complete(form, urls)
        for name, url in urls.items():
            if url:
                await anyio.to_thread.run_sync(fetch_file, form, name, url, store, parser.limits[name], settings)
    except BaseException as e:
        form.discard()
        if isinstance(e, FormParserError):
            raise Problem(400, f"the multipart body is malformed ({e}); send a multipart/form-data "
                               "body as RFC 7578 describes, e.g. with curl -F") from None
        raise
    return form


def check_complete(form: JobForm, urls: dict[str, str | None]) -> None:
    """Each input must come once: as a file or by URL."""
    for name, url in urls.items():
        if url and getattr(form, name) is not None:
            raise Problem(422, f"the form has both {name} and {name}_url; send one of them")
    missing = [name for name, url in urls.items() if getattr(form, name) is None and not url]
    if missing:
        raise Problem(422, f"the form lacks {' and '.join(missing)}: send the model and the samples "
                           "as files, e.g. curl -F model=@model.pt -F samples=@clean.npz, or name "
                           "them by URL, e.g. -F model_url=https://host/model.pt")


def url_field(form: JobForm, name: str) -> str | None:
    """The ``<name>_url`` field's text, if sent and not blank."""
    text = form.texts.get(f"{name}_url")
    if text is None:
        return None
    try:
        return text.decode().strip() or None
    except UnicodeDecodeError:
        raise Problem(422, f"{name}_url is not UTF-8 text; send the URL as plain text") from None


def fetch_file(form: JobForm, name: str, url: str, store: ArtifactStore, limit: int, settings: Settings) -> None:
    """Fetches ``<name>_url`` into a staged file of ``form``, and checks its first bytes as an
    upload's are checked (the rest of the checks are the same for both, at submit)."""
    staged = store.stage()
    try:
        fetched = fetch_input(url, staged, limit, settings)
    except RemoteInputError as e:
        staged.discard()
        if isinstance(e, TooLarge):
            raise too_large(f"the file at {name}_url", name, limit) from None
        raise Problem(e.status, f"{name}_url: {e}",
                      errors=[{"loc": f"{name}_url", "msg": str(e)}]) from None
    except BaseException:
        staged.discard()
        raise
    part = FilePart(name, staged, fetched.filename or name, limit)
    setattr(form, name, part)
    if name == "model":
        form.model_source = fetched.source
    with open(staged.path, "rb") as file:
        part.head = file.read(HEAD_BYTES)
    check_head(part)


def too_large(filename: str, field: str, limit: int) -> Problem:
    return Problem(413, f"{filename} is larger than the {format_bytes(limit)} limit for the {field}; "
                        f"send a smaller file, or ask the operator to raise BAERASE_MAX_{field.upper()}_BYTES")


def check_head(part: FilePart) -> None:
    """Rejects a file whose first bytes belong to no accepted format, before reading the rest."""
    if part.field == "model":
        if not may_be_model(part.head):
            raise Problem(415, f"{part.filename} is not a model file: {MODEL_HELP}")
    elif not is_zip(part.head):
        raise Problem(415, f"{part.filename} is not a sample set: {SAMPLES_HELP}")


def model_format(path: Path, filename: str) -> str:
    """torchscript | state_dict | safetensors (worker/sanitize/formats.py); 422 if it is broken."""
    try:
        return formats.model_format(path, filename)
    except InputError as e:
        raise Problem(422, str(e)) from None


def samples_suffix(path: Path, filename: str) -> str:
    """.npz (arrays x and y) or .zip (class folders of images); 422 if it is neither, or breaks
    the worker's limits on decoded size (checked from the headers: nothing is decoded here)."""
    try:
        formats.zip_names(path, filename)  # a broken zip is answered as such
    except InputError as e:
        raise Problem(422, str(e)) from None
    try:
        with zipfile.ZipFile(path) as archive:
            layout = inspect_samples(archive)
    except InputError as e:
        raise Problem(422, f"{filename}: {e}; {SAMPLES_HELP}") from None
    return ".npz" if layout.kind == "npz" else ".zip"


def format_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
