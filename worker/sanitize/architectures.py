"""Architectures for state_dict / safetensors uploads: a name -> constructor registry of built-in
ones, and torchvision's and timm's models by their own names ("torchvision:resnet18").

Every constructor takes ``num_classes`` and ``in_channels`` and returns a model that maps float32
NCHW images to (N, num_classes) logits. ResNet-18, PreAct-ResNet-18 and VGG-11 are the CIFAR forms
(3x3 stem, no max-pool), which also run on 28x28 inputs.
"""

import importlib
from collections.abc import Callable

import torch
from torch import nn
import torch.nn.functional as F

from .architecture_names import ARCHITECTURE_HELP, ARCHITECTURE_NAMES
from .errors import InputError, first_line

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    assert name in ARCHITECTURE_NAMES, f"list {name!r} in config.ARCHITECTURE_NAMES too"

    def add(constructor):
        ARCHITECTURES[name] = constructor
        return constructor

    return add


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A freshly initialised model; InputError for an unknown name."""
    library, _, library_name = name.partition(":")
    if library in ("torchvision", "timm"):
        return library_model(library, library_name, num_classes, in_channels)
    if name not in ARCHITECTURES:
        raise InputError(f"unknown architecture {name!r}; give {ARCHITECTURE_HELP}")
    return ARCHITECTURES[name](num_classes=num_classes, in_channels=in_channels)


def library_model(library: str, name: str, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision's or timm's model ``name``, untrained (nothing is downloaded), with the
    library's parameter names, so the library's checkpoints load as they are."""
    try:
        module = importlib.import_module(library)
    except Exception as e:  # not installed, or built for another torch (a RuntimeError then)
        raise InputError(f"architecture {library}:{name} needs {library}, which this machine cannot "
                         f"import ({first_line(e)}); install baerase[models] next to a matching "
                         "torch, or upload the model as a TorchScript archive") from e
    try:
        if library == "timm":
            return module.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        if in_channels != 3:
            raise InputError(f"torchvision's models take 3-channel images; the samples have {in_channels}")
        return module.models.get_model(name, weights=None, num_classes=num_classes)
    except InputError:
        raise
    except Exception as e:  # each library has its own error for an unknown name or a bad argument
        raise InputError(f"{library} cannot build {name!r} with {num_classes} classes: {first_line(e)} "
                         f"(its models: {library_listing(library)})") from e


def library_listing(library: str) -> str:
    return "timm.list_models()" if library == "timm" else "torchvision.models.list_models()"


@register("small_cnn")
class SmallCNN(nn.Module):
    """Two conv layers and two linear layers: the classic MNIST-sized classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.pool(x).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


@register("mlp")
class MLP(nn.Module):
    """Two hidden fully connected layers on the image, resampled to 28 x 28: a classifier with no
    convolution, whose ordinary classes need smaller triggers than a convolutional model's."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, side: int = 28):
        super().__init__()
        self.resample = nn.AdaptiveAvgPool2d(side)
        self.fc1 = nn.Linear(in_channels * side * side, 256)
        self.dropout = nn.Dropout(0.2)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.dropout(F.relu(self.fc1(self.resample(x).flatten(1))))
        return self.fc3(F.relu(self.fc2(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if len(self.shortcut) else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNet(nn.Module):
    def __init__(self, block, depths, widths, num_classes: int, in_channels: int):
        super().__init__()
        self.preact = block is PreActBlock
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.Identity() if self.preact else nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, (depth, width) in enumerate(zip(depths, widths)):
            for j in range(depth):
                layers.append(block(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.bn_final = nn.BatchNorm2d(cin) if self.preact else nn.Identity()
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layers(out)
        if self.preact:
            out = F.relu(self.bn_final(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels)


@register("preact_resnet18")
def preact_resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ResNet(PreActBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels)


@register("small_resnet")
def small_resnet(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A narrow ResNet with BatchNorm, cheap enough to train and defend on two CPU cores."""
    return ResNet(BasicBlock, [1, 1, 1], [16, 32, 64], num_classes, in_channels)


@register("backdoorbench:preactresnet18")
class BackdoorBenchPreActResNet18(nn.Module):
    """PreAct-ResNet-18 laid out as BackdoorBench's (SCLBD/BackdoorBench, models/preact_resnet.py)
    names its parameters: conv1, layer1..layer4 of pre-activation blocks, then linear, with no
    batch norm after the last block; its attack results' "model" state_dicts load into it."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        cin = 64
        for i, width in enumerate((64, 128, 256, 512), start=1):
            blocks = [PreActBlock(cin, width, 1 if i == 1 else 2), PreActBlock(width, width, 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = width
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register("vgg11")
class VGG11(nn.Module):
    """VGG-11 with BatchNorm, CIFAR form (one linear classifier after global pooling)."""

    plan = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512]

    def __init__(self, num_classes: int = 10, in_channels: int = 3, batch_norm: bool = True):
        super().__init__()
        layers, cin = [], in_channels
        for item in self.plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                norm = [nn.BatchNorm2d(item)] if batch_norm else []
                layers += [nn.Conv2d(cin, item, 3, padding=1), *norm, nn.ReLU()]
                cin = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


@register("vgg11_nobn")
def vgg11_nobn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """VGG-11 without BatchNorm (the original VGG), the same plan as vgg11. Initialised as
    torchvision's VGG: without BatchNorm, torch's default initialisation shrinks the signal at
    each of the eight convolutions and training starts from near-constant outputs."""
    model = VGG11(num_classes, in_channels, batch_norm=False)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)
    return model
