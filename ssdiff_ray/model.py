"""The diffusers DDPM: UNet presets, flat parameter vectors, sampling, saving as a pipeline."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DModel,
)

# Presets for 1-channel images up to 32x32. "small" is ~1.06M parameters at 16x16.
PRESETS: dict[str, dict] = {
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
    "small": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8),
    "base": dict(block_out_channels=(64, 128, 128), layers_per_block=2, norm_num_groups=16),
}


def build_unet(preset: str, image_size: int, channels: int = 1, seed: int = 0) -> UNet2DModel:
    """A diffusers UNet2DModel of the named size, initialised from ``seed``."""
    p = PRESETS[preset]
    n = len(p["block_out_channels"])
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=p["block_out_channels"],
        layers_per_block=p["layers_per_block"],
        norm_num_groups=p["norm_num_groups"],
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
    )


def build_scheduler(timesteps: int = 1000, beta_schedule: str = "linear") -> DDPMScheduler:
    # "leading" spacing is DDPMScheduler's default and what a saved pipeline reloads with; it is
    # explicit so that DPM-Solver/DDIM built from this config sample the same way here as in
    # DDPMPipeline.from_pretrained (left implicit, from_config picks each class's own default).
    return DDPMScheduler(num_train_timesteps=timesteps, beta_schedule=beta_schedule,
                         timestep_spacing="leading")


def param_layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the parameters, in the order of the flat vector."""
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def get_flat(model: torch.nn.Module) -> np.ndarray:
    """All parameters as one float32 vector (a copy)."""
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu().numpy().copy()


@torch.no_grad()
def set_flat(model: torch.nn.Module, flat: np.ndarray) -> None:
    """Load a flat float32 vector into the parameters (in place)."""
    with warnings.catch_warnings():
        # Ray hands over read-only arrays; we only read them (copy_ into the parameters).
        warnings.simplefilter("ignore", UserWarning)
        vec = torch.as_tensor(np.asarray(flat, dtype=np.float32))
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.copy_(vec[offset:offset + n].view_as(p))
        offset += n
    if offset != vec.numel():
        raise ValueError(f"flat vector has {vec.numel()} values, model has {offset}")


def _sampling_scheduler(scheduler: DDPMScheduler, sampler: str, steps: int):
    """DDIM (eta = 0) or DPM-Solver++ with ``steps`` steps, or ancestral DDPM over all
    timesteps, built from the training scheduler's config."""
    if sampler == "ddim":
        sched = DDIMScheduler.from_config(scheduler.config)
        sched.set_timesteps(steps)
    elif sampler == "dpm":
        # DPM-Solver++ (2nd order): about the quality of DDIM at 2-3x the steps
        sched = DPMSolverMultistepScheduler.from_config(scheduler.config)
        sched.set_timesteps(steps)
    else:
        sched = DDPMScheduler.from_config(scheduler.config)
        sched.set_timesteps(scheduler.config.num_train_timesteps)
    return sched


@torch.no_grad()
def sample(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    n: int,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    x_T: torch.Tensor | None = None,
    batch_size: int = 500,
) -> np.ndarray:
    """Generate ``n`` images in [-1, 1] (N x C x H x W float32).

    ``x_T`` gives the initial noise (e.g. a triggered input); otherwise it is drawn from
    N(0, I) with ``seed``. DDIM (eta = 0) and DPM-Solver++ use ``steps`` steps; DDPM uses all
    timesteps.
    """
    device = next(unet.parameters()).device
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if x_T is None:
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    was_training = unet.training
    unet.eval()
    out = []
    for start in range(0, n, batch_size):
        # a fresh scheduler per batch: multistep solvers (DPM-Solver++) keep a step index
        # and past outputs, so one reused across batches runs past its timesteps
        sched = _sampling_scheduler(scheduler, sampler, steps)
        x = x_T[start:start + batch_size].to(device)
        for t in sched.timesteps:
            eps = unet(x, t).sample
            x = sched.step(eps, t, x, generator=gen).prev_sample
        out.append(x.clamp(-1, 1).cpu())
    unet.train(was_training)
    return torch.cat(out).numpy()


def save_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler, path: str | Path) -> None:
    """Save as a diffusers DDPMPipeline: ``DDPMPipeline.from_pretrained(path)`` loads it."""
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path))
