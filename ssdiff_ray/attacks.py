"""Backdoor attacks on federated DDPM training: BadDiffusion- and TrojDiff-style poisoning.

A malicious client trains on batches where a fraction ``poison_rate`` of the rows is
replaced by a *backdoor* diffusion process: noisy inputs built from a target image ``y``
and a trigger, with a regression target chosen so that the ordinary DDPM/DDIM sampler,
started from triggered noise, produces ``y``. Benign clients are untouched.

* BadDiffusion (Chou et al., CVPR 2023): x'_t = sqrt(ab_t) y + (1 - sqrt(ab_t)) r
  + sqrt(1 - ab_t) eps, target eps + c_t r, trigger input x_T = eps + r. The correction
  c_t depends on the sampler (VillanDiffusion, Chou et al., NeurIPS 2023, see
  ``trigger_coefficient``).
* TrojDiff (Chen et al., CVPR 2023): x'_t = sqrt(ab_t) y + sqrt(1 - ab_t)(gamma eps + mu),
  target eps, trigger input x_T ~ N(mu, gamma^2 I) (blend: everywhere, patch: in a corner).

Core module: no Ray, no Optuna. Images are N x 1 x S x S in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

TRIGGERS = ("box", "stop_sign", "glasses")  # additive BadDiffusion triggers
TROJ_TRIGGERS = ("blend", "patch")  # TrojDiff triggers
TARGETS = ("hat", "cross", "corner")  # fixed target images; "class:K" targets a class
KINDS = ("baddiffusion", "trojdiff")
SAMPLERS = ("ddpm", "ddim", "ode", "both")  # BadDiffusion correction (trigger_coefficient)


# ----------------------------------------------------------------------------- patterns


def _corner_box(size: int) -> tuple[int, int]:
    """Side and offset of a corner patch: ~40% of the image, one pixel from the edge at 16."""
    side = max(3, round(0.4 * size))
    margin = max(0, size // 16)
    return side, size - side - margin


def _octagon(side: int) -> np.ndarray:
    c = (side - 1) / 2
    yy, xx = np.mgrid[:side, :side]
    return (np.abs(yy - c) + np.abs(xx - c)) <= 1.5 * c + 0.5


def make_trigger(name: str, image_size: int) -> np.ndarray:
    """An additive trigger pattern 1 x S x S in [-1, 1], 0 where absent (BadDiffusion's r).

    Sizes scale with the image so a 16 x 16 trigger has a norm of ~5-6: large enough that
    the backdoor is learnable in a few hundred steps, as in the papers' 32 x 32 settings.
    """
    s = image_size
    r = np.zeros((s, s), dtype=np.float32)
    side, off = _corner_box(s)
    if name == "box":  # a grey square frame in the bottom-right corner
        th = max(1, round(s / 8))
        r[off:off + side, off:off + side] = 1.0
        r[off + th:off + side - th, off + th:off + side - th] = 0.0
    elif name == "stop_sign":  # an octagon with a dark bar ("STOP") in the bottom-right corner
        octo = _octagon(side).astype(np.float32)
        mid = side // 2
        octo[mid - max(1, side // 6):mid + max(1, side // 6) - (side % 2 == 0) + 1,
             1:side - 1] *= -1.0
        r[off:off + side, off:off + side] = octo
    elif name == "glasses":  # two dark lenses and a bridge across the upper middle
        h, w = max(2, round(s * 0.19)), max(2, round(s * 0.25))
        top, gap = round(s * 0.25), max(1, round(s * 0.125))
        left = (s - (2 * w + gap)) // 2
        r[top:top + h, left:left + w] = -1.0
        r[top:top + h, left + w + gap:left + 2 * w + gap] = -1.0
        r[top, left + w:left + w + gap] = -1.0
    else:
        raise ValueError(f"unknown trigger {name!r}; choose from {TRIGGERS}")
    return r[None]


def make_troj_trigger(name: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """TrojDiff trigger: (delta, mask), both 1 x S x S. ``delta`` in [-1, 1] is the trigger
    image (mu = (1 - gamma) delta); ``mask`` is where the trigger distribution applies."""
    s = image_size
    if name == "blend":  # a full-frame pattern (the paper blends a Hello-Kitty image)
        yy, xx = np.mgrid[:s, :s] / max(s - 1, 1)
        delta = np.cos(2 * np.pi * 2.0 * np.hypot(yy - 0.5, xx - 0.5)).astype(np.float32)
        return delta[None], np.ones((1, s, s), dtype=np.float32)
    if name == "patch":  # a stop-sign-like patch in the bottom-right corner
        side, off = _corner_box(s)
        delta = make_trigger("stop_sign", s)
        mask = np.zeros((1, s, s), dtype=np.float32)
        mask[:, off:off + side, off:off + side] = 1.0
        delta[mask == 0] = 0.0
        delta[(mask == 1) & (delta == 0)] = 1.0  # fill the octagon's corners: a solid patch
        return delta, mask
    raise ValueError(f"unknown TrojDiff trigger {name!r}; choose from {TROJ_TRIGGERS}")


def make_target(name: str, image_size: int) -> np.ndarray:
    """A fixed target image 1 x S x S in [-1, 1]: a white shape on black."""
    s = image_size
    y = -np.ones((s, s), dtype=np.float32)
    if name == "hat":  # a top hat: brim and crown
        brim_top, brim_h = round(0.62 * s), max(1, round(s / 8))
        y[brim_top:brim_top + brim_h, round(0.12 * s):s - round(0.12 * s)] = 1.0
        y[round(0.25 * s):brim_top, round(0.31 * s):s - round(0.31 * s)] = 1.0
    elif name == "cross":  # a plus sign
        th, lo, hi = max(1, round(s / 8)), round(0.15 * s), s - round(0.15 * s)
        c = (s - th) // 2
        y[lo:hi, c:c + th] = 1.0
        y[c:c + th, lo:hi] = 1.0
    elif name == "corner":  # BadDiffusion's "corner" target: an L in the top-left corner
        th, ln = max(1, round(s / 8)), round(0.5 * s)
        y[1:1 + ln, 1:1 + th] = 1.0
        y[1:1 + th, 1:1 + ln] = 1.0
    else:
        raise ValueError(f"unknown target {name!r}; choose from {TARGETS} or 'class:K'")
    return y[None]


def target_class(target: str) -> int | None:
    """K for a "class:K" target, else None."""
    return int(target.split(":", 1)[1]) if target.startswith("class:") else None


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class AttackSpec:
    """What the malicious clients do. ``scale`` > 1 is model replacement (Bagdasaryan et al.):
    the update is multiplied so it survives averaging with the benign ones."""

    kind: str = "baddiffusion"
    trigger: str = "box"
    target: str = "hat"  # a TARGETS name or "class:K"
    poison_rate: float = 0.1
    gamma: float = 0.6  # TrojDiff noise scale of the trigger distribution
    scale: float = 1.0
    malicious_ids: frozenset[int] = field(default_factory=frozenset)
    sampler: str = "ddim"  # BadDiffusion correction, see trigger_coefficient

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"attack kind {self.kind!r}; choose from {KINDS}")
        names = TRIGGERS if self.kind == "baddiffusion" else TROJ_TRIGGERS
        if self.trigger not in names:
            raise ValueError(f"{self.kind} trigger {self.trigger!r}; choose from {names}")
        if target_class(self.target) is None and self.target not in TARGETS:
            raise ValueError(f"target {self.target!r}; choose from {TARGETS} or 'class:K'")
        if not 0.0 <= self.poison_rate <= 1.0:
            raise ValueError(f"poison_rate {self.poison_rate} not in [0, 1]")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r}; choose from {SAMPLERS}")
        object.__setattr__(self, "malicious_ids", frozenset(int(i) for i in self.malicious_ids))


def choose_malicious(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """A seeded random set of round(fraction * num_clients) client ids (at least 1 if > 0)."""
    k = round(fraction * num_clients)
    k = max(k, 1) if fraction > 0 else 0
    rng = np.random.default_rng(seed)
    return frozenset(int(i) for i in rng.choice(num_clients, size=k, replace=False))


# ----------------------------------------------------------------------------- poisoning


def trigger_coefficient(alphas_cumprod: torch.Tensor, t: torch.Tensor, sampler: str) -> torch.Tensor:
    """c_t in the BadDiffusion target eps + c_t r, per sample (shape N).

    * "ddpm": matching the backdoored posterior mean q(x'_{t-1} | x'_t, y) with the ancestral
      sampler's mean 1/sqrt(a_t) (x_t - beta_t / sqrt(1 - ab_t) eps_theta) gives
      c_t = (1 - sqrt(a_t)) sqrt(1 - ab_t) / (1 - a_t), the corrected BadDiffusion form. It
      needs unclipped x0 predictions: its x0-prediction is y + O(r / sqrt(ab_t)).
    * "ode": VillanDiffusion's probability-flow (DDIM) correction c_t = sqrt(1 - ab_t),
      about twice DDPM's.
    * "ddim": c_t = (1 - sqrt(ab_t)) / sqrt(1 - ab_t), the coefficient whose x0-prediction
      (x'_t - sqrt(1 - ab_t) eps_theta) / sqrt(ab_t) is exactly y: equal to "ode" at large t
      and to "ddpm" near t = 0, and unaffected by the x0 clipping that diffusers' schedulers
      apply (clip_sample=True, as here), which breaks the other two.
    * "both": the mean of "ddpm" and "ddim".
    """
    ab = alphas_cumprod[t].double()
    ab_prev = torch.where(t > 0, alphas_cumprod[(t - 1).clamp(min=0)].double(),
                          torch.ones_like(ab))
    a = ab / ab_prev
    sde = (1 - a.sqrt()) * (1 - ab).sqrt() / (1 - a)
    x0 = (1 - ab.sqrt()) / (1 - ab).sqrt()
    coefs = {"ddpm": lambda: sde, "ode": lambda: (1 - ab).sqrt(), "ddim": lambda: x0,
             "both": lambda: (sde + x0) / 2}
    return coefs[sampler]().float()


def poison_baddiffusion(
    y: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    trigger: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    sampler: str = "ddpm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """BadDiffusion noisy input and regression target for targets ``y`` (N x C x S x S):
    x'_t = sqrt(ab) y + (1 - sqrt(ab)) r + sqrt(1 - ab) eps, target = eps + c_t r."""
    n = y.shape[0]
    ab = alphas_cumprod[t].view(n, 1, 1, 1)
    xt = ab.sqrt() * y + (1 - ab.sqrt()) * trigger + (1 - ab).sqrt() * eps
    c = trigger_coefficient(alphas_cumprod, t, sampler).view(n, 1, 1, 1)
    return xt, eps + c * trigger


def poison_trojdiff(
    y: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    mu: torch.Tensor,
    gamma_map: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TrojDiff noisy input and target: x'_t = sqrt(ab) y + sqrt(1 - ab)(gamma eps + mu),
    target eps. ``gamma_map`` is gamma inside the trigger mask and 1 outside (patch)."""
    n = y.shape[0]
    ab = alphas_cumprod[t].view(n, 1, 1, 1)
    return ab.sqrt() * y + (1 - ab).sqrt() * (gamma_map * eps + mu), eps


def troj_params(spec: AttackSpec, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mu, gamma_map), each 1 x S x S, of the TrojDiff trigger distribution N(mu, gamma^2)."""
    delta, mask = make_troj_trigger(spec.trigger, image_size)
    mu = (1.0 - spec.gamma) * delta * mask
    gamma_map = np.where(mask > 0, spec.gamma, 1.0).astype(np.float32)
    return mu.astype(np.float32), gamma_map


def triggered_noise(spec: AttackSpec, n: int, image_size: int, seed: int) -> torch.Tensor:
    """x_T that activates the backdoor: eps + r (BadDiffusion) or gamma eps + mu (TrojDiff)."""
    eps = torch.randn((n, 1, image_size, image_size), generator=torch.Generator().manual_seed(seed))
    if spec.kind == "baddiffusion":
        return eps + torch.from_numpy(make_trigger(spec.trigger, image_size))
    mu, gamma_map = troj_params(spec, image_size)
    return torch.from_numpy(gamma_map) * eps + torch.from_numpy(mu)


class ClientAttack:
    """What ``ClientGroup.attack`` holds: the poison callable and update scaling per client.

    ``target_images`` (N x 1 x S x S) are the images of the target class for a "class:K"
    target (each poisoned row draws one); ignored for a fixed target image.
    """

    def __init__(
        self,
        spec: AttackSpec,
        alphas_cumprod: torch.Tensor,
        target_images: np.ndarray | None = None,
        image_size: int | None = None,
    ):
        self.spec = spec
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod).float()
        if target_class(spec.target) is not None:
            if target_images is None or len(target_images) == 0:
                raise ValueError(f"target {spec.target!r} needs target_images of that class")
            self.targets = torch.as_tensor(np.asarray(target_images, dtype=np.float32))
        else:
            self.targets = None
        self.image_size = image_size
        self._fixed: dict[int, tuple[torch.Tensor, ...]] = {}  # per image size

    def is_malicious(self, client_id: int) -> bool:
        return int(client_id) in self.spec.malicious_ids

    def _patterns(self, size: int) -> tuple[torch.Tensor, ...]:
        if size not in self._fixed:
            spec = self.spec
            y = (torch.from_numpy(make_target(spec.target, size)) if self.targets is None
                 else torch.empty(0))
            if spec.kind == "baddiffusion":
                pats = (y, torch.from_numpy(make_trigger(spec.trigger, size)))
            else:
                mu, gm = troj_params(spec, size)
                pats = (y, torch.from_numpy(mu), torch.from_numpy(gm))
            self._fixed[size] = pats
        return self._fixed[size]

    def _targets_for(self, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
        if self.targets is None:
            return self._patterns(size)[0].expand(n, 1, size, size)
        idx = torch.randint(0, len(self.targets), (n,), generator=gen)
        return self.targets[idx]

    def poison(self, x0, xt, eps, t, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """``ddpm_loss``'s hook: rewrite rows drawn with probability ``poison_rate``."""
        rows = torch.nonzero(torch.rand(x0.shape[0], generator=gen) < self.spec.poison_rate)[:, 0]
        target = eps.clone()
        if len(rows) == 0:
            return xt, target
        size = x0.shape[-1]
        y = self._targets_for(len(rows), size, gen)
        pats = self._patterns(size)
        if self.spec.kind == "baddiffusion":
            pxt, ptg = poison_baddiffusion(y, eps[rows], t[rows], pats[1], self.alphas_cumprod,
                                           self.spec.sampler)
        else:
            pxt, ptg = poison_trojdiff(y, eps[rows], t[rows], pats[1], pats[2],
                                       self.alphas_cumprod)
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


# ----------------------------------------------------------------------------- metrics


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004): Gaussian window (sigma 1.5, 11 px or the image
    size if smaller), valid positions only, K1 = 0.01, K2 = 0.03. Inputs N x C x H x W."""
    x = torch.as_tensor(np.asarray(a, dtype=np.float64))
    y = torch.as_tensor(np.asarray(b, dtype=np.float64)).expand_as(x)
    c = x.shape[1]
    size = min(11, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2  # odd
    w = _gaussian_window(size, 1.5).repeat(c, 1, 1, 1)
    def conv(z):
        return F.conv2d(z, w, groups=c)

    mx, my = conv(x), conv(y)
    vx, vy, cov = conv(x * x) - mx**2, conv(y * y) - my**2, conv(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return m.mean(dim=(1, 2, 3)).numpy()


def attack_metrics(
    samples: np.ndarray,
    spec: AttackSpec,
    target_image: np.ndarray,
    classifier: torch.nn.Module | None = None,
    threshold: float = 0.1,
) -> dict:
    """Backdoor success on triggered samples (N x 1 x S x S in [-1, 1]).

    ``asr``: fraction whose per-image MSE to the target, in [0, 1] scale, is below
    ``threshold`` (0.1 as in VillanDiffusion); ``mse``/``ssim``: means over samples. For a
    class target, ``target_image`` holds images of the class (the nearest one counts) and,
    with a ``classifier``, ``target_class_rate`` is the fraction classified as K, which is
    then the ASR.
    """
    x = (np.clip(np.asarray(samples, dtype=np.float32), -1, 1) + 1) / 2
    tgt = (np.asarray(target_image, dtype=np.float32).reshape(-1, *x.shape[1:]) + 1) / 2
    d = ((x[:, None] - tgt[None]) ** 2).mean(axis=(2, 3, 4))  # N x T
    nearest = d.argmin(axis=1)
    mse = d[np.arange(len(x)), nearest]
    out = {
        "asr": float((mse < threshold).mean()),
        "mse": float(mse.mean()),
        "ssim": float(ssim(x, tgt[nearest]).mean()),
        "n": len(x),
        "threshold": threshold,
    }
    k = target_class(spec.target)
    if k is not None and classifier is not None:
        with torch.no_grad():
            logits = classifier(torch.from_numpy(np.clip(samples, -1, 1).astype(np.float32)))
        out["target_class_rate"] = float((logits.argmax(1).numpy() == k).mean())
        out["asr"] = out["target_class_rate"]
    return out
