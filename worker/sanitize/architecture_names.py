"""The architecture names a state_dict or safetensors model may be given with (``--arch``,
config ``arch``). Standard library only: the API checks them before queueing a job, and the
command line lists them in its help, without loading torch or pydantic."""

import re

# Built-in architectures (architectures.py builds them). backdoorbench:preactresnet18 has
# BackdoorBench's parameter names (layer1.0.bn1, linear), so its checkpoints load as they are.
ARCHITECTURE_NAMES = ("small_cnn", "small_resnet", "mlp", "resnet18", "preact_resnet18", "vgg11", "vgg11_nobn",
                      "backdoorbench:preactresnet18")
# Architectures of a model library, by the library's own name and with its own parameter names:
# "torchvision:resnet18", "timm:resnet18". Whether the name exists, the worker finds out.
LIBRARY_ARCHITECTURE = re.compile(r"(torchvision|timm):[A-Za-z0-9_.]{1,100}")
ARCHITECTURE_HELP = (f"one of {', '.join(ARCHITECTURE_NAMES)}, or a torchvision or timm model by its "
                     "library's name: torchvision:resnet18, timm:resnet18")


def is_known_architecture(name: str) -> bool:
    return name in ARCHITECTURE_NAMES or LIBRARY_ARCHITECTURE.fullmatch(name) is not None
