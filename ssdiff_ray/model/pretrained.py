"""A pretrained diffusers model to start from (``model.pretrained``): where it is, what it is,
and whether the run's data and adapters fit it, all read without torch (the driver checks
before Ray starts); ``load_unet`` then loads it (torch)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ssdiff_ray.errors import UserError

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


class PretrainedError(UserError):
    """A pretrained model that cannot be used; the message is one line."""


@dataclass
class PretrainedInfo:
    source: str                   # what model.pretrained says
    unet_dir: Path                # the folder with the UNet's config.json
    class_name: str               # UNet2DModel or UNet2DConditionModel
    config: dict                  # the UNet's config.json
    scheduler: dict | None        # the pipeline's scheduler_config.json, if it has one
    shapes: dict[str, tuple] = field(default_factory=dict)  # weight name -> shape


def local_dir(source: str) -> Path:
    """The local folder of ``source``: a directory as is, a hub id fetched to the cache."""
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if p.exists() or source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise PretrainedError(f"model.pretrained = {source!r}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source))
    except Exception as e:  # no network, unknown repo, gated repo: all the same advice
        raise PretrainedError(
            f"model.pretrained = {source!r}: could not fetch it from the Hugging Face hub "
            f"({type(e).__name__}); download it where the network allows (`hf download {source}"
            f" --local-dir DIR`) and pass model.pretrained=DIR") from None


def describe(source: str) -> PretrainedInfo:
    """What ``source`` holds: a diffusers pipeline (``unet/``, ``scheduler/``) or a bare UNet."""
    root = local_dir(source)
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    try:
        config = json.loads((unet_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    name = config.get("_class_name")
    if name not in UNET_CLASSES:
        raise PretrainedError(f"model.pretrained = {source!r}: not a diffusers UNet2DModel or "
                              "UNet2DConditionModel (nor a pipeline with one)")
    sched_file = root / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(sched_file.read_text()) if sched_file.is_file() else None
    return PretrainedInfo(source, unet_dir, name, config, scheduler, _shapes(unet_dir))


def _shapes(unet_dir: Path) -> dict[str, tuple]:
    """Weight shapes from the safetensors header (no tensors read; {} for .bin files)."""
    files = sorted(unet_dir.glob("*.safetensors"))
    if not files:
        return {}
    from safetensors import safe_open

    shapes = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def check_fit(info: PretrainedInfo, image_size: int, channels: int, conditional: bool,
              num_classes: int) -> None:
    """The model takes the data's images (and classes, when conditional)."""
    c, where = info.config, f"model.pretrained = {info.source!r}"
    if c.get("in_channels") != channels:
        raise PretrainedError(f"{where}: the model takes {c.get('in_channels')} channels, "
                              f"the data has {channels}")
    size = c.get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    if size != image_size:
        raise PretrainedError(f"{where}: the model makes {size} x {size} images, "
                              f"data.image_size = {image_size}")
    if conditional and (c.get("num_class_embeds") or 0) < num_classes + 1:
        raise PretrainedError(f"{where}: model.conditional = true needs {num_classes} + 1 class "
                              f"embeddings, the model has {c.get('num_class_embeds') or 0}")


def check_lora_targets(info: PretrainedInfo, targets: list[str], rank: int) -> None:
    """Every target name matches a Linear or Conv2d weight, and ``rank`` fits every match."""
    layers = {k[:-len(".weight")]: s for k, s in info.shapes.items()
              if k.endswith(".weight") and len(s) in (2, 4)}
    if not layers:
        return  # weights in .bin files: peft checks when the pools load the model
    for t in targets:
        hits = {n: s for n, s in layers.items() if n == t or n.endswith("." + t)}
        if not hits:
            example = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in layers})[:12])
            raise PretrainedError(f"lora.target_modules: {t!r} matches no layer of the model "
                                  f"(layer names end in: {example}, ...)")
        for name, shape in hits.items():
            fan_in = int(math.prod(shape[1:]))
            if rank > min(shape[0], fan_in):
                raise PretrainedError(f"lora.rank = {rank}: larger than layer {name} "
                                      f"({shape[0]} x {fan_in})")


def load_unet(source: str):
    """The UNet of ``source`` (a diffusers UNet2DModel or UNet2DConditionModel)."""
    import diffusers

    info = describe(source)
    return getattr(diffusers, info.class_name).from_pretrained(str(info.unet_dir))
