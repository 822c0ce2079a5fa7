"""The devices a worker runs jobs on, found without initialising CUDA (asking nvidia-smi, not
torch), as values for CUDA_VISIBLE_DEVICES: one job runs at a time on each."""

import os
import re
import subprocess

CPU = ""  # CUDA_VISIBLE_DEVICES="" hides every GPU: the engine's device "auto" becomes the CPU
DEVICE_PATTERN = re.compile(r"cpu|cuda:\d+")


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when it is set, else every GPU
    nvidia-smi lists, by UUID (its numbering can differ from CUDA's)."""
    if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):  # no driver, no GPU
        return []
    return [line.strip() for line in listing.splitlines() if line.strip()]


def worker_devices(pinned: str | None) -> list[str]:
    """One entry per job slot: ``pinned`` ("cpu" or "cuda:N", N counting the visible GPUs), or
    else every visible GPU, or the CPU when there is none."""
    gpus = visible_gpus()
    if pinned is None:
        return gpus or [CPU]
    if pinned == "cpu":
        return [CPU]
    index = int(pinned.removeprefix("cuda:"))
    if index >= len(gpus):
        raise ValueError(f"--device {pinned}: this host has {len(gpus)} usable GPU(s)"
                         + (f" ({', '.join(gpus)})" if gpus else ""))
    return [gpus[index]]
