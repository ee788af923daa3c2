"""Edge students: a small configurable CNN classifier trained on a (distilled) data set,
its accuracy on real held-out data, and what it costs an edge device (download of the set
over the radio model, training on the device model)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ssdiff_ray.energy import ChannelConfig, compute_energy_j, compute_s, train_flops_per_step


@dataclass(frozen=True)
class StudentSpec:
    widths: tuple[int, ...] = (32, 64)  # channels of the conv blocks (conv, ReLU, max-pool)
    steps: int = 1000                   # optimiser steps, whatever the set's size
    batch_size: int = 64
    lr: float = 3e-3
    augment: bool = True                # random shifts of up to 2 px and light noise
    seed: int = 0


class StudentCNN(nn.Module):
    def __init__(self, channels: int, num_classes: int, widths=(16, 32)):
        super().__init__()
        layers, c = [], channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(4 * c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The batch moved by up to 2 px (one offset for the batch) plus noise of sd 0.05."""
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    x = torch.roll(x, (dy, dx), dims=(2, 3))
    return (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def train_student(images: np.ndarray, labels: np.ndarray, num_classes: int,
                  spec: StudentSpec = StudentSpec()) -> StudentCNN:
    """Adam with a cosine schedule for ``spec.steps`` steps on batches drawn from the set
    (seeded, so reproducible)."""
    if len(images) == 0:
        raise ValueError("train_student: the data set is empty")
    x = torch.as_tensor(np.array(images, np.float32))  # copies: the inputs may be read-only
    y = torch.as_tensor(np.array(labels, np.int64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = StudentCNN(x.shape[1], num_classes, spec.widths)
        gen = torch.Generator().manual_seed(spec.seed)
        opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, spec.steps)
        for _ in range(spec.steps):
            idx = torch.randint(0, len(x), (min(spec.batch_size, len(x)),), generator=gen)
            xb = augment(x[idx], gen) if spec.augment else x[idx]
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray) -> np.ndarray:
    x = torch.as_tensor(np.asarray(images, np.float32))
    return torch.cat([model(b).argmax(1) for b in x.split(512)]).numpy()


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predict(model, images) == np.asarray(labels)))


def edge_costs(model: nn.Module, spec: StudentSpec, image_shape: tuple[int, ...],
               set_bytes: int, device: str = "rpi4") -> dict:
    """What the device spends: download of the set (the radio model's downlink) and the
    student's training (the device model, at its highest frequency)."""
    from ssdiff_ray.devices import DEVICE_CLASSES

    if device not in DEVICE_CLASSES:
        raise ValueError(f"device {device!r}; choose from {', '.join(DEVICE_CLASSES)}")
    d = DEVICE_CLASSES[device]
    flops = float(train_flops_per_step(model, (torch.zeros(spec.batch_size, *image_shape),))
                  * spec.steps)
    profile = pd.DataFrame([{"accel_power_w": d.accel_power_w, "cpu_hz_max": d.cpu_hz_max,
                             "kappa": d.kappa, "flops_per_cycle": d.flops_per_cycle}])
    radio = ChannelConfig()
    download_s = set_bytes * 8.0 / radio.downlink_rate_bps
    return {"device": device, "train_flops": flops,
            "train_s": float(compute_s(profile, [flops], [d.cpu_hz_max])[0]),
            "train_energy_j": float(compute_energy_j(profile, [flops], [d.cpu_hz_max])[0]),
            "download_s": download_s, "download_energy_j": radio.rx_power_w * download_s}
