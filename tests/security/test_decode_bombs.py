"""Sample sets that are small on the wire and huge once decoded are refused from their headers,
by the API at upload (422, nothing stored) and by the worker's loader (invalid_input) before
they are decoded; as are float samples that are not finite."""

import io
import json
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy

from tests.security.refusals import assert_problem, nothing_stored  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[2]
GiB = 1024**3


def png(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A grey PNG; its pixel data is all zeros (deflated as it is made), or ``rows`` as given."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if rows is None:
        deflate, row_block = zlib.compressobj(9), bytes((width + 1) * 1000)  # filter byte + pixels
        rows = b"".join(deflate.compress(row_block) for _ in range(height // 1000)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def npz_of_zeros(shape: tuple[int, ...], dtype=np.uint8) -> bytes:
    """An .npz whose x has ``shape``, all zeros, streamed into the zip (never in memory whole)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as f:
            npy.write_array_header_1_0(f, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
            left, block = int(np.prod(shape)) * np.dtype(dtype).itemsize, bytes(64 * 1024**2)
            while left:
                f.write(block[:min(left, len(block))])
                left -= min(left, len(block))
        labels = io.BytesIO()
        np.save(labels, np.zeros(shape[0], np.int64))
        archive.writestr("y.npy", labels.getvalue())
    return buffer.getvalue()


def npz(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=np.zeros(len(x), np.int64))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bombs() -> dict[str, tuple[bytes, str]]:
    """name -> (sample set, a word of the refusal)."""
    return {
        # The issue's: 9000 x 9000 PNGs, a few hundred bytes each in the zip.
        "two 9000x9000 PNGs": (zip_of({"a/0.png": png(9000, 9000), "a/1.png": png(9000, 9000)}), "9000 x 9000"),
        # Beyond Pillow's own guard (2 x 89.5 M pixels): DecompressionBombError.
        "a 30000x30000 PNG": (zip_of({"a/0.png": png(30000, 30000, rows=b"")}), "too large to decode"),
        "1 GiB of zeros": (npz_of_zeros((1024, 1024, 1024)), "4.0 GiB"),
        "npz claiming (400000, 28, 28)": (npz_of_zeros((400_000, 28, 28)), "400000 images"),
    }


@pytest.mark.usefixtures("nothing_stored")
@pytest.mark.parametrize("name", ["two 9000x9000 PNGs", "a 30000x30000 PNG", "1 GiB of zeros",
                                  "npz claiming (400000, 28, 28)"])
def test_the_api_refuses_decode_bombs(submit, bombs, name):
    samples, word = bombs[name]
    assert len(samples) < 5 * 1024**2  # small on the wire
    assert_problem(submit(samples=samples, samples_name="bomb.zip"), 422, "bomb.zip", word)


@pytest.mark.usefixtures("nothing_stored")
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_the_api_refuses_non_finite_samples(submit, value):
    x = np.full((4, 1, 8, 8), 0.5, np.float32)
    x[3, 0, 7, 7] = value  # one pixel is enough
    assert_problem(submit(samples=npz(x)), 422, "NaN or infinite")


def test_the_worker_refuses_them_before_decoding(tmp_path, bombs):
    """The loader behind `baerase sanitize` and the workers, in a fresh process: each bomb is
    refused with invalid_input, and the process's peak memory hardly grows."""
    paths = []
    for i, (name, (data, _)) in enumerate(bombs.items()):
        paths.append(str(tmp_path / f"{i}.zip"))
        Path(paths[-1]).write_bytes(data)
    x = np.full((4, 1, 8, 8), 0.5, np.float32)
    x[0, 0, 0, 0] = np.nan
    paths.append(str(tmp_path / "nan.npz"))
    Path(paths[-1]).write_bytes(npz(x))
    script = """
import json, resource, sys
from pathlib import Path
from worker.sanitize.errors import InputError
from worker.sanitize.loading import load_samples
before, refusals = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, []
for path in sys.argv[1:]:
    try:
        load_samples(Path(path))
        refusals.append(None)
    except InputError as e:
        refusals.append(str(e))
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"refusals": refusals, "grown_kib": grown}))
"""
    result = subprocess.run([sys.executable, "-c", script, *paths], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.splitlines()[-1])
    words = [word for _, word in bombs.values()] + ["NaN or infinite"]
    for refusal, word in zip(outcome["refusals"], words, strict=True):
        assert refusal is not None and word in refusal, (refusal, word)
    assert outcome["grown_kib"] < 200 * 1024, outcome  # nothing near a decoded image was allocated


def test_pillows_warning_band_is_refused_too(tmp_path):
    """Between Pillow's warning (89.5 M pixels) and its error: still refused, never decoded."""
    from worker.sanitize.errors import InputError
    from worker.sanitize.loading import load_samples

    path = tmp_path / "warned.zip"
    path.write_bytes(zip_of({"a/0.png": png(10000, 10000, rows=b"")}))
    with pytest.raises(InputError, match="too large to decode"):
        load_samples(path)


def zip_of_empty_entries(count: int) -> bytes:
    """A real zip of ``count`` empty members, written field by field (zipfile would take long)."""
    local, directory = [], []
    offset = 0
    for i in range(count):
        name = f"{i:020d}".encode()
        header = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0) + name
        directory.append(struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0,
                                     len(name), 0, 0, 0, 0, 0, offset) + name)
        local.append(header)
        offset += len(header)
    directory_bytes = b"".join(directory)
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, len(directory_bytes), offset, 0)
    return b"".join(local) + directory_bytes + end


@pytest.fixture(scope="module")
def many_entries() -> bytes:
    # 300,000 entries: 33 MiB on the wire, some 200 MiB of Python objects once zipfile reads them.
    return zip_of_empty_entries(300_000)


@pytest.mark.usefixtures("nothing_stored")
@pytest.mark.parametrize("field", ["samples", "model"])
def test_a_zip_of_countless_entries_is_refused_before_it_is_read(submit, many_entries, field):
    response = submit(**{field: many_entries, f"{field}_name": "entries.zip"})
    assert_problem(response, 422, "entries.zip", "zip entries")


def test_the_loader_refuses_countless_entries_too(tmp_path, many_entries):
    from worker.sanitize.errors import InputError
    from worker.sanitize.loading import load_samples

    path = tmp_path / "entries.zip"
    path.write_bytes(many_entries)
    assert len(zipfile.ZipFile(io.BytesIO(zip_of_empty_entries(3))).namelist()) == 3  # a real zip
    with pytest.raises(InputError, match="zip entries"):
        load_samples(path)
