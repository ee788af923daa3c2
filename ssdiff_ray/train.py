"""Local DDPM training of one client: the epsilon-prediction loss and the update (delta)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from ssdiff_ray.model.unet import get_flat, null_label, predict_eps, set_flat, trainable_mask


def client_seed(seed: int, client_id: int, round_: int) -> int:
    """A 63-bit seed per (run seed, client, round): same inputs -> same local randomness,
    whichever pool or restart trains the client."""
    h = hashlib.blake2b(f"{seed}/{client_id}/{round_}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def noisy_batch(x0: torch.Tensor, alphas_cumprod: torch.Tensor, gen: torch.Generator,
                poison=None, labels: torch.Tensor | None = None, label_dropout: float = 0.0,
                null_label: int | None = None):
    """One DDPM training batch: (x_t, t, regression target, class labels or None).

    ``poison`` (attacks) may rewrite the noisy input and the regression target of part of
    the batch: ``poison(x0, xt, eps, t, gen) -> (xt, target)``. With ``labels`` (a
    conditional model) a share ``label_dropout`` of them become ``null_label``, so one
    network also learns the unconditional score that classifier-free guidance needs.
    """
    n = x0.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (n,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    ab = alphas_cumprod[t].view(n, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    target = eps
    if poison is not None:
        xt, target = poison(x0, xt, eps, t, gen)
    if labels is not None:
        drop = torch.rand(n, generator=gen) < label_dropout
        labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    return xt, t, target, labels


def ddpm_loss(unet: torch.nn.Module, x0: torch.Tensor, alphas_cumprod: torch.Tensor,
              gen: torch.Generator, poison=None, labels: torch.Tensor | None = None,
              label_dropout: float = 0.0) -> torch.Tensor:
    """DDPM epsilon-prediction loss: || eps - eps_theta(sqrt(ab) x0 + sqrt(1-ab) eps, t) ||^2
    on a ``noisy_batch``."""
    xt, t, target, labels = noisy_batch(x0, alphas_cumprod, gen, poison, labels, label_dropout,
                                        null_label(unet))
    dev = next(unet.parameters()).device
    pred = predict_eps(unet, xt.to(dev), t.to(dev), None if labels is None else labels.to(dev))
    return F.mse_loss(pred, target.to(dev))


def round_lr(lr: float, lr_final: float, schedule: str, round_: int, rounds: int) -> float:
    """The clients' learning rate at ``round_`` (1-based) of ``rounds``."""
    if schedule == "constant" or rounds <= 1:
        return lr
    frac = (round_ - 1) / (rounds - 1)  # cosine: lr at round 1, lr_final at the last round
    return lr_final + (lr - lr_final) * 0.5 * (1.0 + math.cos(math.pi * frac))


def warmup_lr(lr: float, step: int, warmup_steps: int) -> float:
    """The lr of local step ``step`` (1-based): rising linearly to ``lr`` over the first
    ``warmup_steps`` steps. Every client starts Adam with fresh moments, and Adam's first steps
    move every weight by about lr, signal or not; the warm-up keeps those noise steps small."""
    return lr if warmup_steps <= 0 else lr * min(1.0, step / warmup_steps)


class LocalTrainer:
    """One model and one optimizer, reused for every client a pool trains (no re-creation).
    Only the trainable parameters (the adapters in LoRA mode) are optimised and returned."""

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor, lr: float,
                 grad_clip: float = 1.0, label_dropout: float = 0.0, warmup_steps: int = 0):
        self.unet = unet
        self.lr, self.warmup_steps = lr, warmup_steps
        self.alphas_cumprod = alphas_cumprod.float()
        self.grad_clip = grad_clip
        self.label_dropout = label_dropout
        from ssdiff_ray.model.lora_ranks import component_axis

        self.params = [p for p in unet.parameters() if p.requires_grad]
        # rank axis of each trainable tensor, for mixed-rank masking (see _mask_components)
        self.rank_axes = [component_axis(n) for n, p in unet.named_parameters() if p.requires_grad]
        self.mask = trainable_mask(unet)  # None: every parameter trains
        self.opt = torch.optim.Adam(self.params, lr=lr)

    def train(
        self,
        global_flat: np.ndarray,
        images: np.ndarray,
        steps: int,
        batch_size: int,
        seed: int,
        poison=None,
        lr: float | None = None,
        labels: np.ndarray | None = None,
        rank: int | None = None,
    ) -> tuple[np.ndarray, float]:
        """Train from the global weights (all parameters) for ``steps`` steps; return (delta of
        the trainable parameters, mean loss). ``labels`` (aligned with ``images``) train a
        class-conditional model; ``rank`` trains only the first ``rank`` components of every
        LoRA adapter (mixed ranks): the others get no gradient, so Adam leaves them be."""
        set_flat(self.unet, global_flat)
        lr = self.lr if lr is None else lr
        self.opt.state.clear()  # fresh Adam moments per client: each starts from the global model
        self.unet.train()
        gen = torch.Generator().manual_seed(seed)
        data = torch.from_numpy(images)
        classes = None if labels is None else torch.from_numpy(np.asarray(labels, np.int64))
        total = 0.0
        for step in range(1, steps + 1):
            for group in self.opt.param_groups:
                group["lr"] = warmup_lr(lr, step, self.warmup_steps)
            idx = torch.randint(0, len(data), (min(batch_size, len(data)),), generator=gen)
            loss = ddpm_loss(self.unet, data[idx], self.alphas_cumprod, gen, poison,
                             None if classes is None else classes[idx], self.label_dropout)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if rank is not None:
                self._mask_components(rank)
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.opt.step()
            total += loss.item()
        start = global_flat if self.mask is None else global_flat[self.mask]
        return get_flat(self.unet, trainable_only=True) - start, total / steps

    @torch.no_grad()
    def _mask_components(self, rank: int) -> None:
        for axis, p in zip(self.rank_axes, self.params):
            if p.grad is not None:
                p.grad.narrow(axis, rank, p.shape[axis] - rank).zero_()
