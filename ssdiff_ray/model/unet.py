"""The diffusers UNet of a run: presets, the training scheduler, flat parameter vectors."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from ssdiff_ray.model import PRESETS


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


def flops_per_sample_step(unet: UNet2DModel) -> float:
    """Training FLOPs per sample per local step: 3x the forward pass (the backward pass
    costs about twice the forward: gradients of activations and of weights)."""
    from ssdiff_ray.energy import forward_flops

    c, s = unet.config.in_channels, unet.config.sample_size
    x = torch.zeros(1, c, s, s, device=next(unet.parameters()).device)
    t = torch.zeros(1, dtype=torch.long, device=x.device)
    return 3.0 * forward_flops(unet, (x, t))
