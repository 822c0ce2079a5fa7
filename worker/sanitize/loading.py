"""Reading and writing user models and clean sample sets, without ever unpickling arbitrary bytes.
Which files are accepted, and as which format, is formats.py's; a state_dict is read with
``weights_only=True``, and a TorchScript archive is checked (operations.py) before it runs.
"""

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn

from .architectures import build_model
from .config import ARCHITECTURE_NAMES
from .errors import InputError, first_line
from .formats import is_zip, model_format, read_head
from .operations import check_archive, check_operations
from .sample_sizes import DAMAGED_ZIP, SampleLayout, check_zip_directory, image_members, inspect_samples, open_image


@dataclass
class LoadedModel:
    module: nn.Module
    format: str  # torchscript | state_dict | safetensors (formats.py)


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
        return LoadedModel(module, kind)

    state = read_state_dict(path, kind)
    if arch is None:
        raise InputError(
            f"{path.name} holds bare weights; name their architecture with --arch "
            f"(one of: {', '.join(ARCHITECTURE_NAMES)}) or upload a TorchScript archive"
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
    return LoadedModel(module.to(device), kind)


def read_state_dict(path: Path, kind: str) -> dict[str, torch.Tensor]:
    try:
        if kind == "safetensors":
            state = load_safetensors(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Not torch's text: it advises loading with weights_only=False, which would run the pickle.
        raise InputError(
            f"cannot read weights from {path.name}: it holds pickled objects (only plain tensors "
            "are accepted; arbitrary pickled objects are refused)"
        ) from e
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
    if not is_zip(read_head(path)):
        raise InputError(
            f"{path.name} is neither an .npz (arrays x and y) nor a .zip of class folders of images"
        )
    check_zip_directory(path, path.name)
    try:
        with zipfile.ZipFile(path) as archive:
            layout = inspect_samples(archive)  # the limits, from the headers, before decoding
            if layout.kind == "npz":
                x, y = read_npz(path)
                names = None
            else:
                x, y, names = read_image_folder_zip(archive, class_names, layout)
    except DAMAGED_ZIP as e:
        raise InputError(f"cannot read {path.name}: {first_line(e)}") from e
    return Samples(x, y, names)


def read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y of an .npz that inspect_samples has checked."""
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
    except (ValueError, *DAMAGED_ZIP) as e:
        raise InputError(f"cannot read {path.name} as .npz: {first_line(e)}") from e
    if x.dtype == np.uint8:
        images = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        xt = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255)
    else:  # float32 (N, C, H, W), finite and in [0, 1]
        xt = torch.from_numpy(np.ascontiguousarray(x))
    return xt, torch.from_numpy(y.astype(np.int64))


def read_image_folder_zip(archive: zipfile.ZipFile, class_names: list[str] | None, layout: SampleLayout):
    """The images of a class-folder zip that inspect_samples has checked (``layout``), decoded
    one at a time into one uint8 array."""
    files = sorted(image_members(archive), key=lambda info: info.filename)

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

    gray = layout.channels == 1
    x = np.empty((layout.count, layout.height, layout.width) + (() if gray else (3,)), np.uint8)
    labels = []
    for i, info in enumerate(files):
        with archive.open(info) as file:
            image = open_image(file, info.filename)
            try:
                x[i] = np.asarray(image.convert("L" if gray else "RGB"))
            except (OSError, ValueError) as e:  # truncated or corrupt pixel data
                raise InputError(f"cannot decode image {info.filename}: {first_line(e)}") from e
        labels.append(index[class_of(info.filename)])
    x = x[:, None] if gray else x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x)).float().div_(255), torch.tensor(labels), names
