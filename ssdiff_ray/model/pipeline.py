"""A run's model on disk: a diffusers pipeline that plain diffusers loads."""

from __future__ import annotations

from pathlib import Path

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel


def save_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler, path: str | Path) -> None:
    """Save as a diffusers DDPMPipeline: ``DDPMPipeline.from_pretrained(path)`` loads it."""
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path))


def load_pipeline(path: str | Path) -> tuple[UNet2DModel, DDPMScheduler]:
    """(unet in eval mode, training scheduler) of a saved pipeline."""
    pipe = DDPMPipeline.from_pretrained(str(path))
    return pipe.unet.eval(), pipe.scheduler
