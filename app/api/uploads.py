"""Receiving a job's files: the multipart body is parsed as it streams in, each file goes chunk by
chunk into a staged file of the artifact store, and the files are then checked by their bytes.

The checks look at structure only (magic bytes, zip member names, the safetensors header). No
model is ever deserialized here: loading, with ``weights_only=True``, happens in the worker.
"""

import json
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import anyio
from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from worker.sanitize.errors import InputError
from worker.sanitize.sample_sizes import check_zip_directory, inspect_samples

from app.api.problems import Problem
from app.core.storage import ArtifactStore, StagedFile

MAX_CONFIG_BYTES = 64 * 1024
# The headers of one part (Content-Disposition, Content-Type): a few hundred bytes in practice;
# the parser would otherwise buffer a header of any length in memory.
MAX_PART_HEADER_BYTES = 16 * 1024
# RFC 2046, section 5.1.1: 1 to 70 characters from this set.
BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
HEAD_BYTES = 16
ZIP_HEADS = (b"PK\x03\x04", b"PK\x05\x06")  # an archive with members, an empty archive
# pickle.dumps(torch's magic number, protocol 2): how a legacy (pre-zip) torch.save file begins.
LEGACY_TORCH_HEAD = bytes.fromhex("80028a0a6cfc9c46f9206aa850192e")
MODEL_SUFFIXES = {"torchscript": ".pt", "state_dict": ".pt", "safetensors": ".safetensors"}
MODEL_HELP = ("upload a TorchScript archive (torch.jit.save), a torch.save'd state_dict or a "
              ".safetensors file")
SAMPLES_HELP = "upload an .npz with arrays x and y, or a .zip of class folders of PNG/JPEG images"


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
    config_text: bytearray | None = None

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
        self.current: FilePart | bytearray | None = None

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
        elif name == "config":
            if self.form.config_text is not None:
                raise Problem(422, "the form has two 'config' fields; send one")
            self.form.config_text = self.current = bytearray()
        else:
            raise Problem(422, f"unexpected form field {name!r}; send model, samples and config")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if isinstance(self.current, bytearray):
            if len(self.current) + len(chunk) > MAX_CONFIG_BYTES:
                raise Problem(413, f"config is larger than {MAX_CONFIG_BYTES // 1024} KiB")
            self.current += chunk
            return
        part = self.current
        if part.staged.size + len(chunk) > part.limit:
            raise Problem(413, f"{part.filename} is larger than the {format_bytes(part.limit)} limit "
                               f"for the {part.field}; send a smaller file, or ask the operator to "
                               f"raise BAERASE_MAX_{part.field.upper()}_BYTES")
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


async def receive_job_form(request: Request, store: ArtifactStore, max_model_bytes: int,
                           max_samples_bytes: int) -> JobForm:
    """Streams the multipart body into staged files; on any error nothing is left behind."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not BOUNDARY.fullmatch(options.get(b"boundary", b"")):
        raise Problem(415, "send the job as multipart/form-data (with a boundary of 1 to 70 "
                           "characters, RFC 2046) with the fields model (file), samples (file) "
                           "and config (JSON, optional)")
    declared = request.headers.get("content-length")
    limit = max_model_bytes + max_samples_bytes + MAX_CONFIG_BYTES + 64 * 1024  # + multipart framing
    if declared and declared.isdigit() and int(declared) > limit:
        raise Problem(413, f"the request is {format_bytes(int(declared))}; the model may have at "
                           f"most {format_bytes(max_model_bytes)} and the samples at most "
                           f"{format_bytes(max_samples_bytes)}")
    parser = JobFormParser(store, max_model_bytes, max_samples_bytes)
    multipart = MultipartParser(options[b"boundary"], parser.callbacks())
    try:
        async for chunk in request.stream():
            # The parser writes file chunks to disk: keep that off the event loop.
            await anyio.to_thread.run_sync(multipart.write, chunk)
        multipart.finalize()
    except BaseException as e:
        parser.form.discard()
        if isinstance(e, FormParserError):
            raise Problem(400, f"the multipart body is malformed ({e}); send a multipart/form-data "
                               "body as RFC 7578 describes, e.g. with curl -F") from None
        raise
    for part in parser.form.files():
        part.staged.close()
    if parser.form.model is None or parser.form.samples is None:
        parser.form.discard()
        missing = [name for name in ("model", "samples") if getattr(parser.form, name) is None]
        raise Problem(422, f"the form lacks {' and '.join(missing)}: send the model and the samples "
                           "as files, e.g. curl -F model=@model.pt -F samples=@clean.npz")
    return parser.form


def check_head(part: FilePart) -> None:
    """Rejects a file whose first bytes belong to no accepted format, before reading the rest."""
    if part.field == "model":
        if not (part.head.startswith(ZIP_HEADS) or part.head.startswith(LEGACY_TORCH_HEAD)
                or looks_like_safetensors(part.head)):
            raise Problem(415, f"{part.filename} is not a model file: {MODEL_HELP}")
    elif not part.head.startswith(ZIP_HEADS):
        raise Problem(415, f"{part.filename} is not a sample set: {SAMPLES_HELP}")


def looks_like_safetensors(head: bytes) -> bool:
    # An 8-byte little-endian header length, then the JSON header.
    return len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < 100 * 1024**2


def model_format(path: Path, filename: str) -> str:
    """torchscript | state_dict | safetensors, from the file's structure; 422 if it is broken."""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    if head.startswith(LEGACY_TORCH_HEAD):
        return "state_dict"
    if looks_like_safetensors(head):
        check_safetensors(path, filename)
        return "safetensors"
    names = zip_names(path, filename)
    # torch.jit.save archives have code/ and constants.pkl; torch.save archives only data.pkl.
    if any("/code/" in name or name.endswith("constants.pkl") for name in names):
        return "torchscript"
    if any(name.endswith("data.pkl") for name in names):
        return "state_dict"
    raise Problem(422, f"{filename} is a zip but neither a TorchScript archive nor a torch.save "
                       f"file; {MODEL_HELP}")


def check_safetensors(path: Path, filename: str) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(header_len)) if header_len <= size - 8 else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise Problem(422, f"{filename} has a broken safetensors header (truncated upload?)")
    try:
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
    except (TypeError, KeyError, IndexError, ValueError):
        raise Problem(422, f"{filename} has a broken safetensors header") from None
    if 8 + header_len + max(ends, default=0) != size:
        raise Problem(422, f"{filename} is {size} bytes, but its safetensors header describes "
                           f"{8 + header_len + max(ends, default=0)}: the upload is truncated or padded")


def samples_suffix(path: Path, filename: str) -> str:
    """.npz (arrays x and y) or .zip (class folders of images); 422 if it is neither, or breaks
    the worker's limits on decoded size (checked from the headers: nothing is decoded here)."""
    zip_names(path, filename)  # a broken zip is answered as such
    try:
        with zipfile.ZipFile(path) as archive:
            layout = inspect_samples(archive)
    except InputError as e:
        raise Problem(422, f"{filename}: {e}; {SAMPLES_HELP}") from None
    return ".npz" if layout.kind == "npz" else ".zip"


def zip_names(path: Path, filename: str) -> list[str]:
    try:
        check_zip_directory(path, filename)  # before zipfile reads the directory into memory
    except InputError as e:
        raise Problem(422, str(e)) from None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise Problem(422, f"{filename} is not a complete zip archive (truncated upload?)") from None


def format_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
