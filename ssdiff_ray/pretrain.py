"""Central (non-federated) DDPM training that saves a diffusers pipeline: the base model that
``model.pretrained`` fine-tunes, made on this machine so nothing needs a download."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ssdiff_ray.config import Config, ConfigError
from ssdiff_ray.data import load_dataset


def pretrain(cfg: Config, out: str | Path, steps: int, progress: bool = True) -> dict:
    """Train ``cfg``'s model (``model.preset`` on ``[data]``) for ``steps`` Adam steps with
    a cosine learning rate from ``train.lr``; save the pipeline to ``out`` (not overwritten).

    With an ``[attack]`` the base model itself is backdoored: every batch is poisoned at
    ``attack.poison_rate`` (a poisoned checkpoint on a model hub; the audit's population of
    models of known status is made this way)."""
    from ssdiff_ray.model.pipeline import save_pipeline
    from ssdiff_ray.model.unet import build_scheduler, unet_for
    from ssdiff_ray.run_dir import resolve
    from ssdiff_ray.train import ddpm_loss

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty (nothing is overwritten)")
    if cfg.train.mode != "full" or cfg.model.pretrained:
        raise ConfigError("ssdiff pretrain trains a fresh model: leave train.mode and "
                          "model.pretrained unset")
    data = load_dataset(cfg.data)
    cfg = resolve(cfg, data)
    unet, sched = unet_for(cfg), build_scheduler(cfg.model.timesteps, cfg.model.beta_schedule)
    t = cfg.train
    opt = torch.optim.Adam(unet.parameters(), lr=t.lr)

    def lr_at(i: int) -> float:  # cosine from train.lr to train.lr_final
        return t.lr_final + (t.lr - t.lr_final) * 0.5 * (1 + math.cos(math.pi * i / steps))

    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels) if cfg.model.conditional else None
    acp = sched.alphas_cumprod.float()
    poison = _central_poison(cfg, data, acp)
    t0, losses = time.perf_counter(), []
    unet.train()
    for i in range(steps):
        idx = torch.randint(0, len(images), (min(t.batch_size, len(images)),), generator=gen)
        loss = ddpm_loss(unet, images[idx], acp, gen, poison, labels=None if labels is None else labels[idx],
                         label_dropout=t.label_dropout)
        for group in opt.param_groups:
            group["lr"] = lr_at(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), t.grad_clip or math.inf)
        opt.step()
        losses.append(loss.item())
        if progress and (i + 1) % max(1, steps // 10) == 0:
            print(f"  step {i + 1}/{steps}  loss {np.mean(losses[-100:]):.4f}", flush=True)
    save_pipeline(unet.eval(), sched, out)
    return {"out": str(out), "steps": steps, "images": len(images),
            "classes": cfg.data.classes or "all", "loss": float(np.mean(losses[-100:])),
            "params": sum(p.numel() for p in unet.parameters()),
            "wall_s": time.perf_counter() - t0}



def _central_poison(cfg: Config, data, alphas_cumprod: torch.Tensor):
    """``ddpm_loss``'s poison hook of the configured attack (None without one)."""
    from dataclasses import replace

    from ssdiff_ray.attacks import attack_spec, make_attack
    from ssdiff_ray.attacks.base import target_images

    spec = attack_spec(cfg)
    if spec is None:
        return None
    spec = replace(spec, malicious_ids=frozenset({0}))  # the one (central) trainer
    return make_attack(spec, alphas_cumprod,
                       target_images(spec, data.images, data.labels)).poison
