"""PNG pictures of recovered triggers, large enough for a person to look at."""

import io

import torch
from PIL import Image

from .recovery import RecoveredTrigger

MIN_SIDE = 256  # small images are scaled up (nearest neighbour) to at least this many pixels


def to_png(image: torch.Tensor) -> bytes:
    """(C, H, W) in [0, 1] -> PNG bytes, scaled up by a whole factor."""
    array = (image.detach().clamp(0, 1) * 255).round().byte().cpu()
    mode = "L" if array.shape[0] == 1 else "RGB"
    picture = Image.fromarray(array[0].numpy() if mode == "L" else array.permute(1, 2, 0).numpy(), mode)
    factor = max(1, -(-MIN_SIDE // max(picture.size)))
    picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def grid(images: torch.Tensor, columns: int = 4, pad: int = 1) -> torch.Tensor:
    """(N, C, H, W) -> one (C, H', W') image with a white frame around each tile."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    canvas = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        canvas[:, top:top + h, left:left + w] = image
    return canvas


def trigger_pictures(trigger: RecoveredTrigger, clean: torch.Tensor, seed: int = 0) -> dict[str, bytes]:
    """Pictures of one recovered trigger: its pattern (mask, blend and patch families), its mask
    (mask family) and clean samples with generated triggers stamped on them. Keys name the
    picture kind."""
    noise = torch.Generator().manual_seed(seed)
    samples = trigger.sample(len(clean), noise)
    if not hasattr(trigger.family, "split"):  # a warp has no pattern to show, only its effect
        return {"stamped": to_png(grid(trigger.stamp(clean, samples).cpu()))}
    parts = trigger.family.split(samples[:1])
    pictures = {"pattern": to_png(parts["pattern"][0])}
    # A blend family's mask is one number (the report's trigger size), no picture: its pattern
    # is shown as it is, since the faint blend would be too dark to see.
    if "mask" in parts and parts["mask"][0].numel() > 1:
        pictures["mask"] = to_png(parts["mask"][0])
        # What the trigger adds to an image: the pattern where the mask is on.
        pictures["pattern"] = to_png(parts["pattern"][0] * parts["mask"][0])
    pictures["stamped"] = to_png(grid(trigger.stamp(clean, samples).cpu()))
    return pictures
