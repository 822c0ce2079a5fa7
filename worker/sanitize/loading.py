"""Reading and writing user models and clean sample sets, without ever unpickling arbitrary bytes.

Model formats (told apart by their bytes, not their names):
- "torchscript": a ``torch.jit.save`` archive, the user's own architecture;
- "state_dict": a ``torch.save``d dict of tensors, read with ``weights_only=True``;
- "safetensors".
The last two need a built-in architecture (see architectures.py).
"""

import io
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn

from .architectures import ARCHITECTURES, build_model
from .errors import InputError
from .operations import check_archive, check_operations

MAX_SAMPLES = 100_000
MAX_UNZIPPED_BYTES = 2 * 1024**3
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def sniff_model_format(head: bytes, zip_names: list[str] | None) -> str | None:
    """Which model format these leading bytes (and zip member names, for zips) belong to."""
    if zip_names is not None:
        if any("/code/" in name or name.endswith("constants.pkl") for name in zip_names):
            return "torchscript"
        if any(name.endswith("data.pkl") for name in zip_names):
            return "state_dict"
        return None
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < 100 * 1024**2 and head[8:9] == b"{":
            return "safetensors"
    if head[:2] == b"\x80\x02":  # legacy (pre-zip) torch.save, still readable with weights_only
        return "state_dict"
    return None


def model_format(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        names = zipfile.ZipFile(path).namelist() if zipfile.is_zipfile(path) else None
    except (OSError, zipfile.BadZipFile) as e:
        raise InputError(f"cannot read the model file {path.name}: {e}") from e
    kind = sniff_model_format(head, names)
    if kind is None:
        raise InputError(
            f"{path.name} is not a TorchScript archive, a torch.save'd state_dict or a "
            "safetensors file; export the model with torch.jit.save(torch.jit.script(model), path) "
            "or save its state_dict"
        )
    return kind


@dataclass
class LoadedModel:
    module: nn.Module
    format: str  # torchscript | state_dict | safetensors
    arch: str | None


def load_model(path: Path, arch: str | None, num_classes: int | None, in_channels: int,
               device: torch.device) -> LoadedModel:
    kind = model_format(path)
    if kind == "torchscript":
        check_archive(path)  # before loading: loading can run the archive's __setstate__ code
        try:
            module = torch.jit.load(str(path), map_location=device)
        except Exception as e:  # torch raises a zoo of RuntimeErrors for broken archives
            raise InputError(f"cannot load the TorchScript archive {path.name}: {first_line(e)}") from e
        check_operations(module)  # before it ever runs
        return LoadedModel(module, kind, None)

    state = read_state_dict(path, kind)
    if arch is None:
        raise InputError(
            f"{path.name} holds bare weights; name their architecture with --arch "
            f"(one of: {', '.join(sorted(ARCHITECTURES))}) or upload a TorchScript archive"
        )
    if num_classes is None:
        num_classes = infer_num_classes(state)
    try:
        module = build_model(arch, num_classes=num_classes, in_channels=in_channels)
    except KeyError as e:
        raise InputError(str(e.args[0])) from e
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(
            f"the weights in {path.name} do not fit architecture {arch!r} with {num_classes} "
            f"classes and {in_channels} input channels: {first_line(e, 300)}"
        ) from e
    return LoadedModel(module.to(device), kind, arch)


def read_state_dict(path: Path, kind: str) -> dict[str, torch.Tensor]:
    try:
        if kind == "safetensors":
            state = load_safetensors(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(
            f"cannot read weights from {path.name}: {first_line(e)} (only plain tensors are "
            "accepted; arbitrary pickled objects are refused)"
        ) from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InputError(f"{path.name} must hold a flat dict of parameter name -> tensor")
    return state


def infer_num_classes(state: dict[str, torch.Tensor]) -> int:
    matrices = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    if not matrices:
        raise InputError("cannot tell the number of classes from the weights; pass --num-classes")
    return int(matrices[-1].shape[0])


def save_model(model: LoadedModel, path: Path) -> None:
    if model.format == "torchscript":
        torch.jit.save(model.module, str(path))
        return
    state = {k: v.detach().cpu().contiguous() for k, v in model.module.state_dict().items()}
    if model.format == "safetensors":
        save_safetensors(state, str(path))
    else:
        torch.save(state, path)


@dataclass
class Samples:
    x: torch.Tensor  # float32 (N, C, H, W) in [0, 1]
    y: torch.Tensor  # int64 (N,)
    class_names: list[str] | None = None


def load_samples(path: Path, class_names: list[str] | None = None) -> Samples:
    if not path.exists():
        raise InputError(f"sample file {path} does not exist")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith(".npy") for name in archive.namelist()):
                x, y = read_npz(path)
                names = None
            else:
                x, y, names = read_image_folder_zip(archive, class_names)
    else:
        raise InputError(
            f"{path.name} is neither an .npz (arrays x and y) nor a .zip of class folders of images"
        )
    if len(y) == 0:
        raise InputError("the sample set is empty")
    if len(y) > MAX_SAMPLES:
        raise InputError(f"the sample set has {len(y)} images; at most {MAX_SAMPLES} are accepted")
    return Samples(x, y, names)


def read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files or "y" not in data.files:
                raise InputError(f"{path.name} must hold arrays named x and y; it has {data.files}")
            x, y = data["x"], data["y"]
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise InputError(f"cannot read {path.name} as .npz: {first_line(e)}") from e
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"y must be a 1-D integer array; got dtype {y.dtype}, shape {y.shape}")
    if len(x) != len(y):
        raise InputError(f"x has {len(x)} images but y has {len(y)} labels")
    if x.dtype == np.uint8 and x.ndim in (3, 4):
        images = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        xt = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255)
    elif x.dtype == np.float32 and x.ndim == 4:
        if x.size and (x.min() < 0 or x.max() > 1):
            raise InputError("float32 x must already be scaled to [0, 1]")
        xt = torch.from_numpy(np.ascontiguousarray(x))
    else:
        raise InputError(
            "x must be uint8 of shape (N,H,W) or (N,H,W,C), or float32 (N,C,H,W) in [0,1]; "
            f"got dtype {x.dtype}, shape {x.shape}"
        )
    return xt, torch.from_numpy(y.astype(np.int64))


def read_image_folder_zip(archive: zipfile.ZipFile, class_names: list[str] | None):
    files = [
        info for info in archive.infolist()
        if not info.is_dir() and PurePosixPath(info.filename).suffix.lower() in IMAGE_SUFFIXES
        and not PurePosixPath(info.filename).name.startswith(".")
        and "__MACOSX" not in info.filename
    ]
    if not files:
        raise InputError("the zip holds no PNG or JPEG images in class folders")
    if sum(info.file_size for info in files) > MAX_UNZIPPED_BYTES:
        raise InputError("the images in the zip are larger than 2 GiB unpacked")
    if len(files) > MAX_SAMPLES:
        raise InputError(f"the zip has {len(files)} images; at most {MAX_SAMPLES} are accepted")

    def class_of(name: str) -> str:
        parts = PurePosixPath(name).parts
        if len(parts) < 2:
            raise InputError(f"{name} is not inside a class folder (expected CLASS/IMAGE.png)")
        return parts[-2]

    found = sorted({class_of(info.filename) for info in files})
    names = class_names or found
    unknown = set(found) - set(names)
    if unknown:
        raise InputError(f"class folders {sorted(unknown)} are not in class_names {names}")
    index = {name: i for i, name in enumerate(names)}

    images, labels = [], []
    for info in sorted(files, key=lambda i: i.filename):
        try:
            images.append(Image.open(io.BytesIO(archive.read(info))))
            images[-1].load()
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"cannot decode image {info.filename}: {first_line(e)}") from e
        labels.append(index[class_of(info.filename)])
    gray = all(im.mode in ("1", "L", "LA", "I", "I;16") for im in images)
    arrays = [np.asarray(im.convert("L" if gray else "RGB")) for im in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise InputError(f"all images must have the same size; found {sorted(shapes)[:3]}")
    x = np.stack(arrays)
    x = x[:, None] if gray else x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x)).float().div_(255), torch.tensor(labels), names


def first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:limit]

