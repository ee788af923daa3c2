"""The diffusers UNet of a run: presets, the training scheduler, flat parameter vectors."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from ssdiff_ray.model import PRESETS


def build_unet(preset: str, image_size: int, channels: int = 1, seed: int = 0,
               num_classes: int = 0) -> UNet2DModel:
    """A diffusers UNet2DModel of the named size, initialised from ``seed``. With
    ``num_classes`` K > 0 it is class-conditional with K + 1 class embeddings: the last is
    "no class", which classifier-free guidance trains (label dropout) and samples with."""
    kw = dict(PRESETS[preset])
    if num_classes:
        kw["num_class_embeds"] = num_classes + 1
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels, **kw)


def unet_for(cfg) -> UNet2DModel:
    """The run's UNet, initialised from its seed (the same on every pool and the server)."""
    d = cfg.data
    return build_unet(cfg.model.preset, d.image_size, d.channels or 1, cfg.seed,
                      d.num_classes if cfg.model.conditional else 0)


def null_label(unet: UNet2DModel) -> int | None:
    """The "no class" label of a class-conditional UNet, None for an unconditional one."""
    k = unet.config.num_class_embeds
    return None if not k else k - 1


def predict_eps(unet: UNet2DModel, x: torch.Tensor, t, class_labels=None) -> torch.Tensor:
    """eps_theta(x, t[, class]); a conditional UNet without labels gets "no class"."""
    if class_labels is None and null_label(unet) is not None:
        class_labels = torch.full((x.shape[0],), null_label(unet), device=x.device)
    return unet(x, t, class_labels=class_labels).sample


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


def guided_eps(unet: UNet2DModel, x: torch.Tensor, t, class_labels: torch.Tensor | None,
               guidance: float = 1.0) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans, 2022): eps_u + w (eps_c - eps_u), one batched
    pass for both; w = 1 is the plain conditional prediction, w = 0 the unconditional one."""
    if class_labels is None or guidance == 1.0:
        return predict_eps(unet, x, t, class_labels)
    null = torch.full_like(class_labels, null_label(unet))
    both = unet(torch.cat([x, x]), t, class_labels=torch.cat([class_labels, null])).sample
    eps_c, eps_u = both.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def flops_per_sample_step(unet: UNet2DModel) -> float:
    """Training FLOPs per sample per local step: 3x the forward pass (the backward pass
    costs about twice the forward: gradients of activations and of weights)."""
    from ssdiff_ray.energy import forward_flops

    c, s = unet.config.in_channels, unet.config.sample_size
    x = torch.zeros(1, c, s, s, device=next(unet.parameters()).device)
    t = torch.zeros(1, dtype=torch.long, device=x.device)
    labels = None if null_label(unet) is None else torch.zeros(1, dtype=torch.long, device=x.device)
    return 3.0 * forward_flops(unet, (x, t, labels))
