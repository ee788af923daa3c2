"""Batched clients: train many clients of one pool as one vmapped step (for GPUs).

Every client keeps its own parameters (stacked along a leading client axis), its own Adam
moments, its own gradient clipping and its own ``torch.Generator``, which draws exactly
what the sequential ``LocalTrainer`` draws (batch indices, timesteps, noise, poison), so
both paths give the same deltas within float tolerance. One step is one
``vmap(grad_and_value(loss))`` over the clients: one kernel launch per layer for all of
them instead of one per client, which keeps a GPU busy with many small clients. On a CPU
the sequential path is faster (see benchmarks/batched.py); ``ray.batched_clients = auto``
therefore batches only on CUDA.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ssdiff_ray.model.unet import null_label, set_flat
from ssdiff_ray.train import noisy_batch, warmup_lr


def use_batched(mode: str, device: str, steps: np.ndarray) -> bool:
    """``ray.batched_clients``: on, off, or auto (CUDA and equal local steps)."""
    if mode == "off" or len(steps) < 2 or len(np.unique(steps)) > 1:
        return False
    return mode == "on" or str(device).startswith("cuda")


class BatchedTrainer:
    """Trains up to ``max_clients`` clients at once on stacked copies of one model."""

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor, lr: float,
                 grad_clip: float = 1.0, betas=(0.9, 0.999), eps: float = 1e-8,
                 max_clients: int = 128, label_dropout: float = 0.0, warmup_steps: int = 0):
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod.float()
        self.null_label, self.label_dropout = null_label(unet), label_dropout
        self.lr, self.grad_clip, self.betas, self.eps = lr, grad_clip, betas, eps
        self.max_clients, self.warmup_steps = max_clients, warmup_steps
        self.names = [n for n, _ in unet.named_parameters()]
        self.buffers = dict(unet.named_buffers())

        conditional = self.null_label is not None

        def loss(params, xt, t, target, mask, labels):
            pred = functional_call(self.unet, (params, self.buffers), (xt, t),
                                   {"class_labels": labels if conditional else None}).sample
            err = ((pred - target) ** 2).mean(dim=(1, 2, 3))
            return (err * mask).sum() / mask.sum()  # mean over this client's real samples

        self.step_fn = vmap(grad_and_value(loss))

    def _batches(self, images, labels, batch_size, gens, poisons):
        """Each client's ``noisy_batch``, drawn from its own generator in the sequential
        path's order; padded to the largest batch (a mask leaves the padding out)."""
        dev = next(self.unet.parameters()).device
        xs, ts, ys, cs = [], [], [], []
        for data, classes, gen, poison in zip(images, labels, gens, poisons):
            idx = torch.randint(0, len(data), (min(batch_size, len(data)),), generator=gen)
            xt, t, target, cl = noisy_batch(data[idx], self.alphas_cumprod, gen, poison,
                                            None if classes is None else classes[idx],
                                            self.label_dropout, self.null_label)
            xs.append(xt), ts.append(t), ys.append(target)
            cs.append(torch.zeros_like(t) if cl is None else cl)
        b = max(len(x) for x in xs)
        mask = torch.zeros(len(xs), b)
        for i, x in enumerate(xs):
            mask[i, :len(x)] = 1
            pad = b - len(x)
            if pad:
                xs[i] = torch.cat([x, x[:1].expand(pad, *x.shape[1:])])
                ys[i] = torch.cat([ys[i], ys[i][:1].expand(pad, *x.shape[1:])])
                ts[i] = torch.cat([ts[i], ts[i][:1].expand(pad)])
                cs[i] = torch.cat([cs[i], cs[i][:1].expand(pad)])
        xs, ts, ys, cs = (torch.stack(v).to(dev) for v in (xs, ts, ys, cs))
        return xs, ts, ys, mask.to(dev), cs

    def train(self, global_flat: np.ndarray, images: list[np.ndarray], steps: int,
              batch_size: int, seeds: list[int], poisons=None, lr: float | None = None,
              labels: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Train every client from the global weights; return (deltas [n x P], mean losses).
        ``labels`` (per client, aligned with its images) for a class-conditional model."""
        if lr is not None:
            self.lr = lr
        poisons = poisons or [None] * len(images)
        labels = labels or [None] * len(images)
        deltas, losses = [], []
        for s in range(0, len(images), self.max_clients):
            part = slice(s, s + self.max_clients)
            d, l_ = self._train(global_flat, images[part], labels[part], steps, batch_size,
                                seeds[part], poisons[part])
            deltas.append(d), losses.append(l_)
        return np.concatenate(deltas), np.concatenate(losses)

    def _train(self, global_flat, images, labels, steps, batch_size, seeds, poisons):
        n = len(images)
        set_flat(self.unet, global_flat)
        base = {k: p.detach() for k, p in self.unet.named_parameters()}
        params = {k: p.unsqueeze(0).repeat(n, *[1] * p.dim()) for k, p in base.items()}
        m = {k: torch.zeros_like(p) for k, p in params.items()}
        v = {k: torch.zeros_like(p) for k, p in params.items()}
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        data = [torch.from_numpy(x) for x in images]
        labels = [None if c is None else torch.from_numpy(np.asarray(c, np.int64)) for c in labels]
        b1, b2 = self.betas
        total = torch.zeros(n, device=m[self.names[0]].device)
        for k in range(1, steps + 1):
            batch = self._batches(data, labels, batch_size, gens, poisons)
            with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no vmap rule
                grads, loss = self.step_fn(params, *batch)
            total += loss.detach()
            lr_k = warmup_lr(self.lr, k, self.warmup_steps)
            with torch.no_grad():
                if self.grad_clip > 0:  # clip_grad_norm_ per client: one norm over all its grads
                    norm = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)
                    coef = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
                for name, g in grads.items():
                    if self.grad_clip > 0:
                        g = g * coef.view(-1, *[1] * (g.dim() - 1))
                    # torch.optim.Adam's update (no weight decay), on all clients at once
                    m[name].lerp_(g, 1 - b1)
                    v[name].mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (v[name].sqrt() / (1 - b2 ** k) ** 0.5).add_(self.eps)
                    params[name].addcdiv_(m[name], denom, value=-lr_k / (1 - b1 ** k))
        flat = torch.cat([(params[k] - base[k]).flatten(1) for k in self.names], 1)
        return flat.cpu().numpy(), (total / steps).cpu().numpy().astype(np.float64)
