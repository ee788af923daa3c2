"""Features of images in the diffusion model's own space: the UNet's middle block on the
image lightly noised (t = ``t``), averaged over space. Selection needs a feature space,
and the cloud that distills has the model but, in federated learning, no real data to
train another network on."""

from __future__ import annotations

import numpy as np
import torch

from ssdiff_ray.model.unet import predict_eps


@torch.no_grad()
def model_features(unet, scheduler, images: np.ndarray, labels: np.ndarray | None = None,
                   t_frac: float = 0.1, seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """N x D features (D: the middle block's channels, mean and std over space), at the
    step ``t_frac`` of the way through the schedule."""
    t = int(t_frac * (len(scheduler.alphas_cumprod) - 1))
    captured: list[torch.Tensor] = []
    hook = unet.mid_block.register_forward_hook(lambda _m, _i, out: captured.append(out))
    ab = float(scheduler.alphas_cumprod[t])
    gen = torch.Generator().manual_seed(seed)
    feats = []
    try:
        for start in range(0, len(images), batch_size):
            x0 = torch.as_tensor(images[start:start + batch_size], dtype=torch.float32)
            xt = ab**0.5 * x0 + (1 - ab) ** 0.5 * torch.randn(x0.shape, generator=gen)
            lab = None if labels is None else torch.as_tensor(labels[start:start + batch_size])
            captured.clear()
            predict_eps(unet, xt, torch.full((len(x0),), t), lab)
            h = captured[-1].flatten(2)
            feats.append(torch.cat([h.mean(2), h.std(2)], 1).numpy())
    finally:
        hook.remove()
    return np.concatenate(feats).astype(np.float32)

