"""The attack interface: what a malicious client's training does, and the noise that fires
the backdoor. A family implements ``poison_rows`` and ``triggered_noise``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ssdiff_ray.attacks import AttackSpec, target_class
from ssdiff_ray.attacks.patterns import make_target


class Attack:
    """What ``ClientPool.attack`` holds: the poison callable and update scaling per client.

    ``target_images`` (N x C x S x S) are the images of the target class for a "class:K"
    target (each poisoned row draws one; needed to poison, i.e. with ``alphas_cumprod``,
    not to make triggered noise); ignored for a fixed target image.
    """

    def __init__(self, spec: AttackSpec, alphas_cumprod: torch.Tensor | None = None,
                 target_images: np.ndarray | None = None):
        self.spec = spec
        self.alphas_cumprod = (None if alphas_cumprod is None
                               else torch.as_tensor(alphas_cumprod).float())
        self.targets = None
        if target_class(spec.target) is not None:
            missing = target_images is None or len(target_images) == 0
            if missing and alphas_cumprod is not None:  # triggered noise needs no targets
                raise ValueError(f"target {spec.target!r} needs target_images of that class")
            if not missing:
                self.targets = torch.as_tensor(np.asarray(target_images, dtype=np.float32))

    # --- what a family defines ---------------------------------------------------------
    def poison_rows(self, y: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backdoored (noisy input, regression target) for targets ``y`` at timesteps ``t``."""
        raise NotImplementedError

    def triggered_noise(self, n: int, image_size: int, seed: int) -> torch.Tensor:
        """x_T that activates the backdoor (N x C x S x S)."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------
    def is_malicious(self, client_id: int) -> bool:
        return int(client_id) in self.spec.malicious_ids

    def target_image(self, size: int) -> torch.Tensor:
        """The fixed target image (C x S x S)."""
        return torch.from_numpy(make_target(self.spec.target, size, self.spec.channels))

    def _targets_for(self, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
        if self.targets is None:
            return self.target_image(size).expand(n, self.spec.channels, size, size)
        idx = torch.randint(0, len(self.targets), (n,), generator=gen)
        return self.targets[idx]

    def poison(self, x0, xt, eps, t, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """``ddpm_loss``'s hook: rewrite rows drawn with probability ``poison_rate``."""
        rows = torch.nonzero(torch.rand(x0.shape[0], generator=gen) < self.spec.poison_rate)[:, 0]
        target = eps.clone()
        if len(rows) == 0:
            return xt, target
        y = self._targets_for(len(rows), x0.shape[-1], gen)
        pxt, ptg = self.poison_rows(y, eps[rows], t[rows])
        xt = xt.clone()
        xt[rows], target[rows] = pxt, ptg
        return xt, target

    def poison_for(self, client_id: int) -> Callable | None:
        """The poison callable for a malicious client, None for a benign one."""
        return self.poison if self.is_malicious(client_id) and self.spec.poison_rate > 0 else None

    def scale_update(self, client_id: int, delta: np.ndarray) -> np.ndarray:
        """Model replacement: a malicious client's delta times ``scale`` (others unchanged)."""
        if self.is_malicious(client_id) and self.spec.scale != 1.0:
            return (delta * np.float32(self.spec.scale)).astype(delta.dtype, copy=False)
        return delta


def target_images(spec: AttackSpec, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The backdoor's target: one fixed image, or the data set's images of the target class."""
    k = target_class(spec.target)
    if k is None:
        return make_target(spec.target, images.shape[-1], images.shape[1])[None]
    return images[labels == k]
