"""How large a sample set becomes once decoded, read from its headers before anything is decoded.

A few hundred bytes of zip can hold a PNG header that claims 30000 x 30000 pixels, or an .npy
header that claims (400000, 28, 28): decoding first and counting afterwards is how a worker runs
out of memory. ``inspect_samples`` reads only the .npy headers and the image headers (Pillow opens
images lazily: ``size`` is known before ``load``), checks them against the limits below, and
refuses NaN and infinite float pixels. The API calls it at upload time, the worker again before
loading (loading.py); it needs no torch.
"""

import math
import os
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
from numpy.lib import format as npy
from PIL import Image, UnidentifiedImageError

from .errors import InputError, first_line

MAX_SAMPLES = 100_000  # images per job
MAX_IMAGE_PIXELS = 2048 * 2048  # height x width of one image
# The float32 tensor the engine holds: N x C x H x W x 4 bytes.
MAX_DECODED_BYTES = 2 * 1024**3
# One image file in a zip: a PNG of MAX_IMAGE_PIXELS RGB pixels that does not compress is ~12 MiB;
# Pillow reads unknown PNG chunks into memory whole.
MAX_IMAGE_FILE_BYTES = 64 * 1024**2
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16"}
# A zip's central directory: zipfile reads it whole and makes an object of every entry, so a
# 1 GiB upload of empty entries would take tens of GiB. 100,000 images with names of 100
# characters need about 15 MiB.
MAX_ZIP_DIRECTORY_BYTES = 16 * 1024**2
# What reading a member of a broken or forged zip raises.
DAMAGED_ZIP = (zipfile.BadZipFile, zlib.error, EOFError, OSError)
# Float pixels are checked this many bytes at a time, so that the check needs little memory.
SCAN_BYTES = 16 * 1024**2


@dataclass(frozen=True)
class SampleLayout:
    kind: str  # npz | images
    count: int
    channels: int
    height: int
    width: int
    dtype: str  # of x in an npz (uint8 or float32); uint8 for images

    @property
    def decoded_bytes(self) -> int:
        return self.count * self.channels * self.height * self.width * 4


def inspect_samples(archive: zipfile.ZipFile) -> SampleLayout:
    """The layout of an .npz (arrays x and y) or a zip of class folders of images; raises
    InputError when it breaks a limit or holds non-finite pixels."""
    try:
        if any(name.endswith(".npy") for name in archive.namelist()):
            layout = npz_layout(archive)
        else:
            layout = image_layout(archive)
    except DAMAGED_ZIP as e:
        raise InputError(f"the zip is damaged: {first_line(e)}") from e
    if layout.count == 0:
        raise InputError("the sample set is empty")
    if layout.count > MAX_SAMPLES:
        raise InputError(f"the sample set has {layout.count} images; at most {MAX_SAMPLES} are accepted")
    if layout.height * layout.width > MAX_IMAGE_PIXELS:
        raise InputError(f"the images are {layout.width} x {layout.height} pixels; at most "
                         f"{MAX_IMAGE_PIXELS:,} pixels per image are accepted (e.g. 2048 x 2048)")
    if layout.decoded_bytes > MAX_DECODED_BYTES:
        raise InputError(f"the sample set decodes to {layout.decoded_bytes / 1024**3:.1f} GiB of float32 "
                         f"pixels; at most {MAX_DECODED_BYTES / 1024**3:.0f} GiB are accepted: send "
                         "fewer or smaller images")
    if layout.dtype == "float32":
        try:
            check_float_pixels(archive)
        except DAMAGED_ZIP as e:
            raise InputError(f"the zip is damaged: {first_line(e)}") from e
    return layout


def check_zip_directory(path: Path, name: str) -> None:
    """Refuses the zip (called ``name`` in messages) whose central directory is larger than
    MAX_ZIP_DIRECTORY_BYTES, from its end records (PKWARE APPNOTE 4.3.14-4.3.16), before zipfile
    reads it."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 22 - 65535))  # the end record, then a comment of at most 64 KiB
        tail = f.read()
        end = tail.rfind(b"PK\x05\x06")
        if end < 0 or len(tail) - end < 22:
            raise InputError(f"{name} is not a complete zip archive (truncated upload?)")
        (directory_bytes,) = struct.unpack_from("<I", tail, end + 12)
        locator = end - 20  # zip64: the 32-bit field is full and the size is in the zip64 end record
        if directory_bytes == 0xFFFFFFFF and locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":
            (record,) = struct.unpack_from("<Q", tail, locator + 8)
            f.seek(record)
            zip64_end = f.read(56)
            if len(zip64_end) < 56 or not zip64_end.startswith(b"PK\x06\x06"):
                raise InputError(f"{name} is not a complete zip archive (truncated upload?)")
            (directory_bytes,) = struct.unpack_from("<Q", zip64_end, 40)
    if directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise InputError(f"{name} lists {directory_bytes / 1024**2:.0f} MiB of zip entries; at most "
                         f"{MAX_ZIP_DIRECTORY_BYTES // 1024**2} MiB are accepted (far more than "
                         f"{MAX_SAMPLES:,} images need)")


def npy_header(archive: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of an array in an .npz, checked against the member's size."""
    info = archive.getinfo(name)
    try:
        with archive.open(info) as f:
            version = npy.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npy.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = npy.read_array_header_2_0(f)
            else:  # 3.0 only adds UTF-8 field names, which no accepted dtype has
                raise InputError(f"{name} has .npy format version {version}; save it with numpy.savez")
            data_start = f.tell()
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"cannot read the header of {name}: {e}") from e
    if dtype.hasobject:
        raise InputError(f"cannot read {name}: it holds Python objects; send plain numbers")
    if info.file_size != data_start + math.prod(shape) * dtype.itemsize:
        raise InputError(f"{name} is {info.file_size} bytes, but its header describes an array "
                         f"{shape} of {dtype}: the file is truncated or padded")
    return shape, dtype


def npz_layout(archive: zipfile.ZipFile) -> SampleLayout:
    names = archive.namelist()
    if "x.npy" not in names or "y.npy" not in names:
        raise InputError(f"the .npz must hold arrays named x and y; it has {names[:10]}")
    x_shape, x_dtype = npy_header(archive, "x.npy")
    y_shape, y_dtype = npy_header(archive, "y.npy")
    if len(y_shape) != 1 or not np.issubdtype(y_dtype, np.integer):
        raise InputError(f"y must be a 1-D integer array; got dtype {y_dtype}, shape {y_shape}")
    if x_dtype == np.uint8 and len(x_shape) == 3:
        (n, h, w), c = x_shape, 1
    elif x_dtype == np.uint8 and len(x_shape) == 4:
        n, h, w, c = x_shape
    elif x_dtype == np.float32 and len(x_shape) == 4:
        n, c, h, w = x_shape
    else:
        raise InputError("x must be uint8 of shape (N,H,W) or (N,H,W,C), or float32 (N,C,H,W) in "
                         f"[0,1]; got dtype {x_dtype}, shape {x_shape}")
    if n != y_shape[0]:
        raise InputError(f"x has {n} images but y has {y_shape[0]} labels")
    return SampleLayout("npz", n, c, h, w, x_dtype.name)


def check_float_pixels(archive: zipfile.ZipFile) -> None:
    """Float x must be finite and in [0, 1]: a NaN passes every comparison and trains nothing."""
    with archive.open("x.npy") as f:
        version = npy.read_magic(f)
        _, _, dtype = (npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0)(f)
        step = SCAN_BYTES - SCAN_BYTES % dtype.itemsize
        while chunk := f.read(step):
            values = np.frombuffer(chunk, dtype)
            if not np.isfinite(values).all():
                raise InputError("x holds NaN or infinite values; send finite pixels in [0, 1]")
            if values.size and (values.min() < 0 or values.max() > 1):
                raise InputError("float32 x must already be scaled to [0, 1]")


def image_members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The PNG and JPEG files of a zip, without folders, hidden files and macOS metadata."""
    return [info for info in archive.infolist()
            if not info.is_dir() and PurePosixPath(info.filename).suffix.lower() in IMAGE_SUFFIXES
            and not PurePosixPath(info.filename).name.startswith(".")
            and "__MACOSX" not in info.filename]


def open_image(file: IO[bytes], name: str) -> Image.Image:
    """The image, opened lazily (header read, pixels not decoded yet); refused when Pillow takes
    it for a decompression bomb or it has more than MAX_IMAGE_PIXELS."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(file)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{name} is too large to decode: {e}") from e
    except (UnidentifiedImageError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise InputError(f"cannot decode image {name}: {first_line(e)}") from e
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{name} is {width} x {height} pixels; at most {MAX_IMAGE_PIXELS:,} pixels "
                         "per image are accepted (e.g. 2048 x 2048)")
    return image


def image_layout(archive: zipfile.ZipFile) -> SampleLayout:
    files = image_members(archive)
    if not files:
        raise InputError("the zip holds no PNG or JPEG images in class folders")
    if len(files) > MAX_SAMPLES:
        raise InputError(f"the zip has {len(files)} images; at most {MAX_SAMPLES} are accepted")
    if sum(info.file_size for info in files) > MAX_DECODED_BYTES:
        raise InputError(f"the images in the zip are larger than {MAX_DECODED_BYTES // 1024**3} GiB unpacked")
    sizes, gray = set(), True
    for info in files:
        if info.file_size > MAX_IMAGE_FILE_BYTES:
            raise InputError(f"{info.filename} is {info.file_size / 1024**2:.0f} MiB; an image file may "
                             f"have at most {MAX_IMAGE_FILE_BYTES // 1024**2} MiB")
        with archive.open(info) as file:  # only the header is decompressed
            image = open_image(file, info.filename)
            sizes.add(image.size)
            gray = gray and image.mode in GRAY_MODES
    if len(sizes) > 1:
        raise InputError(f"all images must have the same size; found {sorted(sizes)[:3]}")
    (width, height), = sizes
    return SampleLayout("images", len(files), 1 if gray else 3, height, width, "uint8")

