"""The diffusers UNet of a run: presets, the training scheduler, flat parameter vectors."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

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
    """The run's UNet, the same on every pool and the server: ``model.pretrained`` or a fresh
    ``model.preset`` initialised from the seed, with adapters when ``train.mode = lora``."""
    d = cfg.data
    if cfg.model.pretrained:
        from ssdiff_ray.model.pretrained import load_unet

        unet = load_unet(cfg.model.pretrained)
    else:
        unet = build_unet(cfg.model.preset, d.image_size, d.channels or 1, cfg.seed,
                          d.num_classes if cfg.model.conditional else 0)
    if cfg.train.mode == "lora":
        from ssdiff_ray.model.adapters import add_lora

        add_lora(unet, cfg.lora, cfg.seed)
    return unet


def null_label(unet: UNet2DModel) -> int | None:
    """The "no class" label of a class-conditional UNet, None for an unconditional one."""
    k = unet.config.num_class_embeds
    return None if not k else k - 1


def predict_eps(unet: UNet2DModel, x: torch.Tensor, t, class_labels=None) -> torch.Tensor:
    """eps_theta(x, t[, class]); a conditional UNet without labels gets "no class"."""
    if class_labels is None and null_label(unet) is not None:
        class_labels = torch.full((x.shape[0],), null_label(unet), device=x.device)
    return _forward(unet, x, t, class_labels)


def _forward(unet, x: torch.Tensor, t, class_labels) -> torch.Tensor:
    """One UNet pass. A UNet2DConditionModel (Stable Diffusion's UNet) also cross-attends to
    a context: here row ``class`` (0 when unconditional) of a fixed random table, so class
    conditioning needs no text encoder."""
    if not isinstance(unet, UNet2DConditionModel):
        return unet(x, t, class_labels=class_labels).sample
    rows = unet.config.num_class_embeds or 1
    table = context_table(rows, unet.config.cross_attention_dim).to(x.device)
    idx = class_labels if class_labels is not None else torch.zeros(len(x), dtype=torch.long)
    return unet(x, t, encoder_hidden_states=table[idx.to(x.device)],
                class_labels=class_labels).sample


def context_table(rows: int, dim: int) -> torch.Tensor:
    """rows x 1 x dim, fixed by its shape (seed 0): the same wherever the model is loaded."""
    return torch.randn(rows, 1, dim, generator=torch.Generator().manual_seed(0))


def build_scheduler(timesteps: int = 1000, beta_schedule: str = "linear") -> DDPMScheduler:
    # "leading" spacing is DDPMScheduler's default and what a saved pipeline reloads with; it is
    # explicit so that DPM-Solver/DDIM built from this config sample the same way here as in
    # DDPMPipeline.from_pretrained (left implicit, from_config picks each class's own default).
    return DDPMScheduler(num_train_timesteps=timesteps, beta_schedule=beta_schedule,
                         timestep_spacing="leading")


def param_layout(model: torch.nn.Module, trainable_only: bool = False
                 ) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the (trainable) parameters, in the order of the flat vector."""
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()
            if p.requires_grad or not trainable_only]


def get_flat(model: torch.nn.Module, trainable_only: bool = False) -> np.ndarray:
    """All parameters (or the trainable ones: the adapters in LoRA mode) as one float32
    vector (a copy)."""
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    return torch.nn.utils.parameters_to_vector(params).detach().cpu().numpy().copy()


def trainable_mask(model: torch.nn.Module) -> np.ndarray | None:
    """True where ``get_flat(model)`` holds a trainable parameter; None when all are."""
    if all(p.requires_grad for p in model.parameters()):
        return None
    return np.concatenate([np.full(p.numel(), p.requires_grad) for p in model.parameters()])


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
    both = _forward(unet, torch.cat([x, x]), t, torch.cat([class_labels, null]))
    eps_c, eps_u = both.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def sampling_flops_per_image(unet: UNet2DModel, steps: int, guided: bool = False) -> float:
    """FLOPs to generate one image: ``steps`` forward passes, twice each with classifier-free
    guidance (the conditional and the unconditional prediction)."""
    from ssdiff_ray.energy import forward_flops

    c, s = unet.config.in_channels, unet.config.sample_size
    x = torch.zeros(1, c, s, s, device=next(unet.parameters()).device)
    t = torch.zeros(1, dtype=torch.long, device=x.device)
    labels = None if null_label(unet) is None else torch.zeros(1, dtype=torch.long, device=x.device)
    return float(forward_flops(_Eps(unet), (x, t, labels))) * steps * (2 if guided else 1)


def flops_per_sample_step(unet: UNet2DModel) -> float:
    """Training FLOPs per sample per local step: 3x the forward pass (the backward pass
    costs about twice the forward: gradients of activations and of weights). With adapters
    the frozen base still runs forward and passes activation gradients back (2x), and only
    the adapters' own weight gradients are saved: 2x the base's forward + 3x the adapters'."""
    from ssdiff_ray.energy import forward_flops

    c, s = unet.config.in_channels, unet.config.sample_size
    x = torch.zeros(1, c, s, s, device=next(unet.parameters()).device)
    t = torch.zeros(1, dtype=torch.long, device=x.device)
    labels = None if null_label(unet) is None else torch.zeros(1, dtype=torch.long, device=x.device)
    total = forward_flops(_Eps(unet), (x, t, labels))
    frozen = any(not p.requires_grad for p in unet.parameters())
    if not frozen:
        return 3.0 * total
    adapters = forward_flops(_Eps(unet), (x, t, labels), only=lambda name: ".lora_" in name)
    return 2.0 * (total - adapters) + 3.0 * adapters


class _Eps(torch.nn.Module):
    """predict_eps as a module, so forward_flops counts either UNet class."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, labels):
        return predict_eps(self.unet, x, t, labels)
