"""Reading and writing user models and clean sample sets, without ever unpickling arbitrary bytes.
Which files are accepted, and as which format, is formats.py's; a state_dict is read with
``weights_only=True``, and a TorchScript archive is checked (operations.py) before it runs.
"""

import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn

from .architectures import build_model
from .architecture_names import ARCHITECTURE_HELP
from .errors import InputError, first_line
from .formats import is_zip, model_format, read_head
from .operations import check_archive, check_operations
from .sample_sizes import DAMAGED_ZIP, SampleLayout, check_zip_directory, image_members, inspect_samples, open_image


# Where training code keeps the weights inside a checkpoint dict: Lightning and most training
# loops ("state_dict"), BackdoorBench's attack and defense results ("model"), PyTorch's tutorials.
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes that wrappers put in front of every parameter name: DataParallel and
# DistributedDataParallel ("module."), torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Checkpoint:
    """How a state_dict sat in its file, so the sanitized weights are written back the same way."""

    container: dict | None = None  # the whole checkpoint dict, when the weights were one entry of it
    key: str | None = None  # that entry's name
    prefix: str = ""  # what was stripped from every parameter name
    metadata: dict[str, str] | None = None  # a safetensors file's __metadata__


@dataclass
class LoadedModel:
    module: nn.Module
    format: str  # torchscript | state_dict | safetensors (formats.py)
    checkpoint: Checkpoint | None = None  # None for TorchScript


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

    state, checkpoint = read_state_dict(path, kind)
    if arch is None:
        raise InputError(f"{path.name} holds bare weights; name their architecture with --arch "
                         f"({ARCHITECTURE_HELP}) or upload a TorchScript archive")
    if num_classes is None:
        num_classes = infer_num_classes(state)
    module = build_model(arch, num_classes=num_classes, in_channels=in_channels)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(
            f"the weights in {path.name} do not fit architecture {arch!r} with {num_classes} "
            f"classes and {in_channels} input channels: {first_line(e, 300)}"
        ) from e
    return LoadedModel(module.to(device), kind, checkpoint)


def read_state_dict(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], Checkpoint]:
    """The parameter name -> tensor dict of a state_dict or safetensors file, unwrapped from a
    checkpoint dict and from wrapper prefixes, and how it was wrapped."""
    metadata = None
    try:
        if kind == "safetensors":
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata()
            loaded = load_safetensors(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch.load refuses pickled objects with pickle's UnpicklingError; matched by name so that
        # this module needs no pickle import. Not torch's text: it advises loading with
        # weights_only=False, which would run the pickle.
        if type(e).__name__ == "UnpicklingError":
            raise InputError(
                f"cannot read weights from {path.name}: it holds pickled objects, which are refused (only "
                "tensors, numbers, strings and containers of them are read); save the weights alone, "
                "torch.save(model.state_dict(), path), or of a checkpoint that holds data sets too (such as "
                "BackdoorBench's attack_result.pt), its weights entry: torch.save(checkpoint['model'], path)"
            ) from e
        raise InputError(
            f"cannot read weights from {path.name}: {first_line(e)} (only plain tensors are "
            "accepted; arbitrary pickled objects are refused)"
        ) from e
    checkpoint = Checkpoint(metadata=metadata)
    state = loaded
    if not is_tensor_dict(loaded) and isinstance(loaded, dict):
        checkpoint.key = next((key for key in CHECKPOINT_KEYS if is_tensor_dict(loaded.get(key))), None)
        if checkpoint.key is not None:
            checkpoint.container, state = loaded, loaded[checkpoint.key]
    if not is_tensor_dict(state):
        raise InputError(f"{path.name} must hold a dict of parameter name -> tensor, or a checkpoint "
                         f"dict with one under {' or '.join(map(repr, CHECKPOINT_KEYS))}")
    for prefix in WRAPPER_PREFIXES:  # in this order: DataParallel wraps a compiled model, not the reverse
        if all(name.startswith(prefix) for name in state):
            state = {name.removeprefix(prefix): tensor for name, tensor in state.items()}
            checkpoint.prefix += prefix
    return state, checkpoint


def is_tensor_dict(value) -> bool:
    return isinstance(value, dict) and len(value) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def infer_num_classes(state: dict[str, torch.Tensor]) -> int:
    matrices = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    if not matrices:
        raise InputError("cannot tell the number of classes from the weights; pass --num-classes")
    return int(matrices[-1].shape[0])


def save_model(model: LoadedModel, path: Path) -> None:
    """Writes the model as it came: the same format, and a state_dict under the same parameter
    names, in the same checkpoint dict (its other entries, such as the epoch, kept as they were)."""
    if model.format == "torchscript":
        torch.jit.save(model.module, str(path))
        return
    checkpoint = model.checkpoint
    state = {checkpoint.prefix + name: tensor.detach().cpu().contiguous()
             for name, tensor in model.module.state_dict().items()}
    if model.format == "safetensors":
        save_safetensors(state, str(path), metadata=checkpoint.metadata)
    elif checkpoint.container is not None:
        torch.save({**checkpoint.container, checkpoint.key: state}, path)
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


def samples_from_tensors(x: torch.Tensor, y: torch.Tensor, class_names: list[str] | None = None) -> Samples:
    """In-memory samples, held to a sample file's rules: x float (N, C, H, W), finite and in
    [0, 1]; y N integer labels."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InputError(f"x and y must be torch tensors; got {type(x).__name__} and {type(y).__name__}")
    if x.dim() != 4 or not x.is_floating_point() or len(x) == 0:
        raise InputError(f"x must be float images of shape (N, C, H, W) in [0, 1], N > 0; got {x.dtype} "
                         f"of shape {tuple(x.shape)}")
    if y.shape != (len(x),) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputError(f"y must hold one integer label per image ({len(x)}); got {y.dtype} of shape "
                         f"{tuple(y.shape)}")
    x = x.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise InputError("x holds NaN or infinite values; give finite pixels in [0, 1]")
    if x.min() < 0 or x.max() > 1:
        raise InputError("x must be scaled to [0, 1]; for a model that expects normalised input, "
                         "give mean and std in the config")
    return Samples(x.contiguous(), y.detach().to("cpu", torch.int64), class_names)


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
