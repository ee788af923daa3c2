"""Generating images from a UNet: DPM-Solver++, DDIM or ancestral DDPM (diffusers' schedulers)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from ssdiff_ray.model.unet import guided_eps


def sampling_scheduler(scheduler: DDPMScheduler, sampler: str, steps: int):
    """DDIM (eta = 0), DPM-Solver++ or ancestral DDPM with ``steps`` steps, built from the
    training scheduler's config. DDPM with fewer steps than training timesteps steps over
    a strided grid (diffusers' ``DDPMPipeline(num_inference_steps=...)``); with as many or
    more it visits every timestep."""
    if sampler == "ddpm":
        sched = DDPMScheduler.from_config(scheduler.config)
        sched.set_timesteps(min(steps, scheduler.config.num_train_timesteps))
        return sched
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    if sampler == "ddim":
        return ddim
    # DPM-Solver++ (2nd order), two changes from its defaults, each measured on the main job's
    # model (benchmarks/samplers.py): x0 clipped to [-1, 1] as the config clips it for DDPM and
    # DDIM (`thresholding` with sample_max_value = clip range is that clip; unclipped, ~23% of
    # samples ended as salt-and-pepper static), and DDIM's grid, which ends at t = 0 (the
    # solver's own "leading" grid ends at t = 100 and returns a blurred x0 estimate from there).
    c = scheduler.config
    sched = DPMSolverMultistepScheduler.from_config(
        c, thresholding=bool(c.get("clip_sample", True)),
        sample_max_value=float(c.get("clip_sample_range", 1.0)))
    sched.set_timesteps(timesteps=ddim.timesteps.tolist())
    return sched


# On the CPU, batches whose activations stay in cache are fastest: about 2**15 image pixels
# per forward pass (128 images at 16x16, 32 at 32x32), 1.1-1.9x faster than 500 images on
# 2 cores (benchmarks/gen_batch.py). An accelerator wants large batches.
CPU_PIXELS_PER_BATCH = 2**15
DEVICE_BATCH = 500


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
    batch_size: int | None = None,
    labels: np.ndarray | torch.Tensor | None = None,
    guidance: float = 1.0,
) -> np.ndarray:
    """Generate ``n`` images in [-1, 1] (N x C x H x W float32).

    ``x_T`` gives the initial noise (e.g. a triggered input); otherwise it is drawn from
    N(0, I) with ``seed``. Every sampler takes ``steps`` steps (``sampling_scheduler``). A
    class-conditional UNet generates ``labels`` (one per image) with classifier-free
    ``guidance``, or, without labels, unconditionally ("no class"). ``batch_size`` defaults
    to ``CPU_PIXELS_PER_BATCH`` pixels per forward pass on the CPU, ``DEVICE_BATCH`` images
    elsewhere: DDIM and DPM-Solver++ give the same images at any batch size; DDPM's noise
    draws follow it.
    """
    device = next(unet.parameters()).device
    size = unet.config.sample_size
    if batch_size is None:
        batch_size = (max(1, CPU_PIXELS_PER_BATCH // (size * size)) if device.type == "cpu"
                      else DEVICE_BATCH)
    shape = (n, unet.config.in_channels, size, size)
    if x_T is None:
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    was_training = unet.training
    unet.eval()
    out = []
    for start in range(0, n, batch_size):
        # a fresh scheduler per batch: multistep solvers (DPM-Solver++) keep a step index
        # and past outputs, so one reused across batches runs past its timesteps
        sched = sampling_scheduler(scheduler, sampler, steps)
        x = x_T[start:start + batch_size].to(device)
        cl = None if labels is None else torch.as_tensor(
            np.asarray(labels)[start:start + batch_size], dtype=torch.long, device=device)
        for t in sched.timesteps:
            eps = guided_eps(unet, x, t, cl, guidance)
            x = sched.step(eps, t, x, generator=gen).prev_sample
        out.append(x.clamp(-1, 1).cpu())
    unet.train(was_training)
    return torch.cat(out).numpy()
