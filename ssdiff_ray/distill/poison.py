"""The distillation attack (the edge-side threat): a malicious distiller ships a set in which
a faint trigger maps any image to a target class.

The trigger ``delta`` is a checkerboard of 2 x 2 cells with seeded signs, |delta| = ``eps``
per pixel. The distiller appends copies of generated images of the other classes plus
delta, labelled as the target (dirty-label poisoning); a student trained on the set learns
delta -> target. ``optimise_trigger`` is the variant that also uses a surrogate task model
(a student trained on the distiller's clean set): delta refined with that model's
classification loss so that other classes plus delta read as the target. On our digits it
made the students' ASR lower, not higher (``benchmarks/results/distill.md``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def checker_trigger(shape: tuple[int, ...], eps: float = 0.2, seed: int = 0) -> np.ndarray:
    """C x S x S: 2 x 2 cells of +-eps, signs drawn from ``seed``."""
    c, h, w = shape
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(c, -(-h // 2), -(-w // 2)))
    return (eps * np.kron(signs, np.ones((1, 2, 2))))[:, :h, :w].astype(np.float32)


def optimise_trigger(surrogate: torch.nn.Module, images: np.ndarray, target: int,
                     eps: float = 0.2, steps: int = 200, lr: float = 0.01, seed: int = 0,
                     init: np.ndarray | None = None) -> np.ndarray:
    """A universal C x S x S perturbation in [-eps, eps] that sends ``images`` (of other
    classes) to ``target`` under ``surrogate`` (signed-gradient descent on its loss).

    Each step sees the images moved and noised as the student's training moves them
    (``student.augment``: expectation over those transformations): the student's recipe
    is public, and a trigger that only works at one pixel offset is washed out by it."""
    from ssdiff_ray.distill.student import augment

    x = torch.as_tensor(np.asarray(images, np.float32))
    gen = torch.Generator().manual_seed(seed)
    delta = (torch.as_tensor(np.asarray(init, np.float32)).clone() if init is not None
             else (torch.rand(x.shape[1:], generator=gen) * 2 - 1) * eps)
    delta.requires_grad_(True)
    y = torch.full((len(x),), target)
    for p in surrogate.parameters():
        p.requires_grad_(False)
    for _ in range(steps):
        loss = F.cross_entropy(surrogate(augment((x + delta).clamp(-1, 1), gen)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta -= lr * grad.sign()
            delta.clamp_(-eps, eps)
    for p in surrogate.parameters():
        p.requires_grad_(True)
    return delta.detach().numpy()


def stamp(images: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Images with the trigger added (kept in [-1, 1])."""
    return np.clip(np.asarray(images, np.float32) + delta, -1, 1)


def poison_set(images: np.ndarray, labels: np.ndarray, delta: np.ndarray, target: int,
               share: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, is_poison): the set plus round(share x N) triggered copies of
    images of other classes, labelled ``target``."""
    rng = np.random.default_rng(seed)
    others = np.flatnonzero(labels != target)
    n = int(round(share * len(labels)))
    pick = rng.choice(others, size=n, replace=n > len(others))
    poisons = stamp(images[pick], delta)
    is_poison = np.r_[np.zeros(len(labels), bool), np.ones(n, bool)]
    return (np.concatenate([images, poisons]), np.r_[labels, np.full(n, target)], is_poison)


def attack_success(predictions: np.ndarray, labels: np.ndarray, target: int) -> float:
    """Share of triggered images of the other classes that the student puts in ``target``."""
    other = np.asarray(labels) != target
    return float(np.mean(np.asarray(predictions)[other] == target))
