"""Which model and sample files are accepted, told apart by their bytes, not their names. It
imports no torch, so the API's upload checks (app/api/uploads.py) and the engine's loader
(loading.py) apply the same rules; nothing here deserializes a model.

Models: "torchscript" (a ``torch.jit.save`` archive), "state_dict" (a ``torch.save``d dict of
tensors, or a checkpoint dict holding one; zip or legacy pickle) or "safetensors"; the last two
need an architecture (config.ARCHITECTURE_HELP). ``torch.export`` archives (.pt2) are refused:
``torch.export.load`` runs Python code and pickles from the archive (its guards, its symbolic
shapes, weights marked use_pickle), which no check here can make safe. Samples: a zip, either an .npz or class folders of images
(sample_sizes.py reads which, and checks their size).
"""

import json
import re
import struct
import zipfile
from pathlib import Path, PurePosixPath

from .errors import InputError
from .sample_sizes import check_zip_directory

# Enough leading bytes to tell every accepted format apart.
HEAD_BYTES = 16
ZIP_HEADS = (b"PK\x03\x04", b"PK\x05\x06")  # an archive with members, an empty archive
# pickle.dumps(torch's magic number, protocol 2): how a legacy (pre-zip) torch.save file begins.
LEGACY_TORCH_HEAD = bytes.fromhex("80028a0a6cfc9c46f9206aa850192e")
# The file the sanitized model is stored as, by format.
MODEL_SUFFIXES = {"torchscript": ".pt", "state_dict": ".pt", "safetensors": ".safetensors"}
MODEL_HELP = ("upload a TorchScript archive (torch.jit.save), a torch.save'd state_dict or a "
              ".safetensors file")
EXPORT_REFUSAL = ("is a torch.export archive (.pt2), which is refused: loading one runs Python code "
                  "stored in it; upload the model as a TorchScript archive "
                  "(torch.jit.save(torch.jit.script(model), path)) or save its state_dict")
SAMPLES_HELP = "upload an .npz with arrays x and y, or a .zip of class folders of PNG/JPEG images"


def read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEAD_BYTES)


def is_zip(head: bytes) -> bool:
    return head.startswith(ZIP_HEADS)


def looks_like_safetensors(head: bytes) -> bool:
    # An 8-byte little-endian header length, then the JSON header.
    return len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < 100 * 1024**2


def may_be_model(head: bytes) -> bool:
    """Whether a file that begins with these bytes can be a model at all."""
    return is_zip(head) or head.startswith(LEGACY_TORCH_HEAD) or looks_like_safetensors(head)


def model_format(path: Path, name: str | None = None) -> str:
    """torchscript | state_dict | safetensors, from the structure of the file (called ``name``
    in messages, its file name by default); InputError when it is none of them, or broken."""
    name = name or path.name
    try:
        head = read_head(path)
    except OSError as e:
        raise InputError(f"cannot read the model file {name}: {e}") from e
    if head.startswith(LEGACY_TORCH_HEAD):
        return "state_dict"
    if looks_like_safetensors(head):
        check_safetensors(path, name)
        return "safetensors"
    if not is_zip(head):
        raise InputError(f"{name} is not a TorchScript archive, a torch.save'd state_dict or a "
                         "safetensors file; export the model with torch.jit.save(torch.jit.script(model), "
                         "path) or save its state_dict")
    names = zip_names(path, name)
    if any(PurePosixPath(member).name == "archive_format" for member in names):  # torch.export.save's marker
        raise InputError(f"{name} {EXPORT_REFUSAL}")
    # torch.jit.save archives have code/ and constants.pkl; torch.save archives only data.pkl.
    if any("/code/" in member or member.endswith("constants.pkl") for member in names):
        return "torchscript"
    if any(member.endswith("data.pkl") for member in names):
        return "state_dict"
    raise InputError(f"{name} is a zip but neither a TorchScript archive nor a torch.save file; {MODEL_HELP}")


def check_safetensors(path: Path, name: str) -> None:
    """The header must parse and describe exactly the bytes that follow it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(header_len)) if header_len <= size - 8 else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise InputError(f"{name} has a broken safetensors header (truncated upload?)")
    try:
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (TypeError, KeyError, IndexError, ValueError):
        raise InputError(f"{name} has a broken safetensors header") from None
    if 8 + header_len + max(ends, default=0) != size:
        raise InputError(f"{name} is {size} bytes, but its safetensors header describes "
                         f"{8 + header_len + max(ends, default=0)}: the upload is truncated or padded")


def zip_names(path: Path, name: str) -> list[str]:
    """The member names of a zip, once its directory has been size-checked; InputError when it
    is not a complete zip."""
    check_zip_directory(path, name)  # before zipfile reads the directory into memory
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise InputError(f"{name} is not a complete zip archive (truncated upload?)") from None


def sanitized_name(filename: str, default_suffix: str) -> str:
    """The sanitized model's file name on every path (`baerase sanitize`'s output, the service's
    download): the input's, ``.sanitized`` before its suffix (backdoored.pt ->
    backdoored.sanitized.pt); ``default_suffix`` for an input without one. Any directory part is
    dropped, either separator (uploads come from every operating system)."""
    name = PurePosixPath(re.split(r"[\\/]", filename)[-1])
    return f"{name.stem}.sanitized{name.suffix or default_suffix}"
