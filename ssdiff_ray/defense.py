"""Sampling-time backdoor defense: estimate the trigger from the model, detect triggered
inputs, negate them, and audit the model before serving.

* ``estimate_trigger``: trigger inversion without clean data, in the spirit of Elijah (An
  et al., AAAI 2024) and TERD (Mo et al., ICML 2024). Elijah's distribution shift at t = T
  (E[eps_theta(eps + r, T)] ~ lambda r, lambda ~ 0.5) exists only for backdoors tuned to
  ancestral DDPM; a backdoor tuned to DDIM answers eps + r like a clean model at t = T
  (lambda ~ 1), and clean models have adversarial directions with large shifts. What every
  working backdoor shares is Elijah's second observation, that eps + r generates one image
  whatever eps. The default estimator (``method="probe"``, ``trigger_probe``) reads that
  as a detector: the few clean inputs the backdoor captures all generate its target (a
  cluster of near-duplicates among clean generations), and Stein estimates of its
  region's boundary normal turn their mean into the trigger's direction. Without such a
  cluster it falls back to the scan: the basin is narrow (along a * r the spread of the
  outputs first rises and collapses only near a = 1), so gradient descent on the spread
  from small or random tau misses it, while a scan of localized +-1 patches, hill-climbed
  in size and position to the least output spread (``scan_trigger``), can land in it.
  ``method="gradient"`` keeps the Elijah/TERD gradient inversion and refinement.
* ``detect_inputs``: TERD's likelihood ratio log N(x; mu, gamma^2) - log N(x; 0, I), plus a
  model-free DisDet-style test (Sui et al., 2024) of x_T against N(0, I) (mean, variance,
  kurtosis, local-window mean and energy). Thresholds come from N(0, I) draws only, at a
  nominal false-positive rate; no triggered data is used. ``ufid_scores`` adds UFID's
  output-consistency score (Guan et al., 2024), optional since it costs sampling.
* ``purify`` / ``defended_sample``: a flagged input has the estimated trigger removed, or
  is resampled, until it passes; the sample is generated from the clean input.
* ``audit_model``: verdict "clean"/"backdoored" from the uniformity of what eps + tau
  generates, against random directions of the same norm.

Core module: no Ray, no Optuna.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ssdiff_ray.model import sample
from ssdiff_ray.trigger_probe import (
    boundary_direction,
    first_crossing,
    hit_rates_along,
    keep_significant,
    near_duplicate_cluster,
)

METHODS = ("probe", "scan", "gradient")  # estimate_trigger

# ----------------------------------------------------------------------------- estimation


@dataclass
class TriggerEstimate:
    """The estimated trigger distribution of x_T: N(mu, gamma^2 I) with mu = tau."""

    tau: np.ndarray  # 1 x S x S
    mu: np.ndarray  # mean of the triggered input distribution (= tau)
    gamma: float = 1.0
    shift_norm: float = 0.0  # ||E[eps(eps + tau, T) - eps(eps, T)] - tau||
    response: float = 1.0  # lambda: tau . E[eps(eps+tau,T) - eps(eps,T)] / ||tau||^2
    stats: dict = field(default_factory=dict)

    @property
    def tau_norm(self) -> float:
        return float(np.linalg.norm(self.tau))


def _t_last(scheduler) -> int:
    return int(scheduler.config.num_train_timesteps) - 1


def _dev(unet) -> torch.device:
    return next(unet.parameters()).device


def _eps_at(unet, x: torch.Tensor, t: int) -> torch.Tensor:
    """eps_theta(x, t) on the model's device, returned on the CPU."""
    dev = _dev(unet)
    return unet(x.to(dev), torch.full((x.shape[0],), t, device=dev)).sample.cpu()


def mean_shift(unet, scheduler, tau: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """E_eps[eps_theta(eps + tau, T) - eps_theta(eps, T)] - tau (zero for an ideal clean
    model, (lambda - 1) r for a backdoored one at its trigger r). Differentiable in tau."""
    t = _t_last(scheduler)
    with torch.no_grad():
        base = _eps_at(unet, eps, t).mean(0)
    return _eps_at(unet, eps + tau, t).mean(0) - base - tau[0]


def _project(tau: torch.Tensor, radius: float) -> torch.Tensor:
    n = tau.norm()
    return tau * (radius / n) if n > radius else tau


def _terd_refine(unet, scheduler, tau: torch.Tensor, gen: torch.Generator, steps: int,
                 batch: int, lr: float, radius: float) -> torch.Tensor:
    """TERD's refinement: outputs generated from eps + tau, re-noised to t ~ T and shifted
    by tau, should leave a residual (noise - prediction) independent of the noise draw."""
    from diffusers import DDIMScheduler

    ac = scheduler.alphas_cumprod.float()
    tlast = _t_last(scheduler)
    dev = _dev(unet)
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(10)
    shape = (batch, *tau.shape)
    tau = tau.clone().requires_grad_(True)
    opt = torch.optim.Adam([tau], lr=lr)
    for _ in range(steps):
        with torch.no_grad():  # short DDIM generation from the current trigger
            x = (torch.randn(shape, generator=gen) + tau.detach()).to(dev)
            for t in ddim.timesteps:
                x = ddim.step(unet(x, t).sample, t, x).prev_sample
            x = x.cpu()
        t = torch.randint(tlast - 10, tlast + 1, (batch,), generator=gen)
        ab = ac[t].view(-1, 1, 1, 1)
        n1, n2 = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        r1 = n1 - unet((ab.sqrt() * x + (1 - ab).sqrt() * n1 + tau).to(dev), t.to(dev)).sample.cpu()
        r2 = n2 - unet((ab.sqrt() * x + (1 - ab).sqrt() * n2 + tau).to(dev), t.to(dev)).sample.cpu()
        loss = 0.5 * (r1 - r2).square().sum(dim=(1, 2, 3)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            tau.copy_(_project(tau, radius))
    return tau.detach()


def ddim_generate(unet, scheduler, x_T: torch.Tensor, steps: int = 8, clip: bool = True
                  ) -> torch.Tensor:
    """A short deterministic DDIM run (x0 clipped to [-1, 1] like the server's sampler),
    differentiable in ``x_T``; runs on the model's device, returns on the CPU.

    ``clip=False`` leaves x0 unclipped: trigger estimation needs it, since a backdoor
    target is exactly +-1 and the gradient through a saturated clamp is zero."""
    ac = scheduler.alphas_cumprod.float()
    n_train = int(scheduler.config.num_train_timesteps)
    ts = list(range(0, n_train, n_train // steps))[::-1]  # diffusers' "leading" spacing
    dev = _dev(unet)
    x = x_T.to(dev)
    for i, t in enumerate(ts):
        a = ac[t].to(dev)
        a_prev = ac[ts[i + 1]].to(dev) if i + 1 < len(ts) else torch.ones((), device=dev)
        e = unet(x, torch.full((x.shape[0],), t, device=dev)).sample
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        if clip:
            x0 = x0.clamp(-1, 1)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
    return x.cpu()


def output_spread(unet, scheduler, tau: torch.Tensor, eps: torch.Tensor, steps: int = 8,
                  clip: bool = True) -> torch.Tensor:
    """Per-pixel variance, over the noise draws, of what a short DDIM run makes of eps + tau.
    A backdoor maps every eps + r to its one target (Elijah's uniformity): spread ~ 0."""
    out = ddim_generate(unet, scheduler, eps + tau, steps, clip)
    return out.var(0).mean()


Patch = tuple[int, int, int, int, float]  # (row, col, height, width, amplitude)


def patch_image(p: Patch, image_size: int, channels: int = 1) -> torch.Tensor:
    """A solid rectangle of ``amplitude`` (C x S x S), zero elsewhere."""
    i, j, h, w, a = p
    x = torch.zeros((channels, image_size, image_size))
    x[:, i:i + h, j:j + w] = a
    return x


def patch_candidates(image_size: int, sizes: tuple[float, ...] = (0.25, 0.4),
                     stride: int | None = None) -> list[Patch]:
    """Square patches of +1 and -1 at every ``stride``-th position (and flush with the
    far edges), sides a fraction of the image: the trigger scan's coarse grid."""
    s = image_size
    stride = stride or max(1, s // 8)
    out = []
    for frac in sizes:
        w = max(2, round(frac * s))
        starts = sorted({*range(0, s - w + 1, stride), s - w})
        out += [(i, j, w, w, a) for i in starts for j in starts for a in (1.0, -1.0)]
    return out


def patch_neighbours(p: Patch, image_size: int) -> list[Patch]:
    """Patches one pixel away: moved, or one edge grown or shrunk."""
    i, j, h, w, a = p
    cand = [(i + di, j + dj, h, w, a) for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1))]
    cand += [(i, j, h + dh, w + dw, a) for dh, dw in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    cand += [(i - 1, j, h + 1, w, a), (i, j - 1, h, w + 1, a)]
    return [(ci, cj, ch, cw, a) for ci, cj, ch, cw, a in cand
            if ci >= 0 and cj >= 0 and ch >= 2 and cw >= 2
            and ci + ch <= image_size and cj + cw <= image_size]


@torch.no_grad()
def scan_patches(unet, scheduler, candidates: torch.Tensor, eps: torch.Tensor, base: float,
                 steps: int = 8, chunk: int = 256) -> np.ndarray:
    """Output spread of eps + candidate over the clean spread, per candidate (clipped DDIM,
    as the sampler runs). A backdoor's basin is narrow -- along a * r the spread first
    rises, then collapses near a = 1 -- so gradient descent from small or random starts
    misses it; a scan of localized patches lands in it for patch triggers."""
    k, e = len(candidates), len(eps)
    x = (candidates[:, None] + eps[None]).flatten(0, 1)  # K*E x C x S x S
    outs = torch.cat([ddim_generate(unet, scheduler, x[i:i + chunk], steps)
                      for i in range(0, len(x), chunk)])
    return (outs.view(k, e, -1).var(1).mean(1) / max(base, 1e-8)).numpy()


def scan_trigger(unet, scheduler, image_size: int, channels: int, gen: torch.Generator,
                 base: float, n_eps: int = 32, steps: int = 8, max_climb: int = 30,
                 max_area: float = 0.2) -> tuple[Patch, float]:
    """The patch whose eps + patch generates the least diverse outputs: a coarse scan of
    ``patch_candidates``, a fine grid of squares around the winner, then hill climbing over
    ``patch_neighbours`` (same noise draws throughout, so the comparisons are paired).
    Patches cover at most ``max_area`` of the image: a trigger is a local patch, and a +1
    patch over most of the image saturates any model's outputs, clean or not.
    Returns (patch, spread ratio)."""
    area_px = max_area * image_size * image_size
    eps = torch.randn((n_eps, channels, image_size, image_size), generator=gen)

    def spread(ps: list[Patch]) -> np.ndarray:
        if not ps:
            return np.zeros(0, np.float32)
        imgs = torch.stack([patch_image(p, image_size, channels) for p in ps])
        return scan_patches(unet, scheduler, imgs, eps, base, steps)

    cands = patch_candidates(image_size)
    sc = spread(cands)
    i0, j0, h0, _, a0 = cands[int(sc.argmin())]
    # fine grid around the coarse winner: squares within 2 pixels of its corner and size
    fine = [(i, j, w, w, a0) for w in range(max(2, h0 - 2), h0 + 3)
            for i in range(i0 - 2, i0 + 3) for j in range(j0 - 2, j0 + 3)
            if i >= 0 and j >= 0 and i + w <= image_size and j + w <= image_size
            and w * w <= area_px]
    fine = [p for p in fine if p not in set(cands)]
    cands, sc = cands + fine, np.concatenate([sc, spread(fine)])
    best, best_sc = cands[int(sc.argmin())], float(sc.min())
    seen = set(cands)
    for _ in range(max_climb):
        nb = [p for p in patch_neighbours(best, image_size)
              if p not in seen and p[2] * p[3] <= area_px]
        if not nb:
            break
        seen.update(nb)
        sn = spread(nb)
        if sn.min() >= best_sc:
            break
        best, best_sc = nb[int(sn.argmin())], float(sn.min())
    return best, best_sc


@torch.no_grad()
def prune_patch(unet, scheduler, tau: torch.Tensor, eps: torch.Tensor, base: float,
                steps: int = 8, tol: float = 0.1, max_rounds: int = 8) -> torch.Tensor:
    """Drop the pixels of a patch that the collapse does not need (TERD's refinement, for a
    patch): a solid rectangle found by the scan also covers pixels of no use to the backdoor
    (a frame's hole, a row beside the trigger), which dilute the detector's mean. Each round
    tries removing every pixel, removes those whose removal keeps the spread within ``tol``
    (relative) of the patch's, at most a quarter of them at once, and keeps the removal only
    if the pruned patch stays within ``tol`` too (else removes the single best pixel)."""
    cur = tau.clone()
    limit = (1 + tol) * float(scan_patches(unet, scheduler, cur[None], eps, base, steps)[0])
    for _ in range(max_rounds):
        on = torch.nonzero(cur.abs().sum(0)).tolist()
        if len(on) <= 4:
            break
        trials = cur[None].repeat(len(on), 1, 1, 1)
        for k, (i, j) in enumerate(on):
            trials[k, :, i, j] = 0
        sc = scan_patches(unet, scheduler, trials, eps, base, steps)
        order = [int(k) for k in np.argsort(sc) if sc[k] <= limit][:max(1, len(on) // 4)]
        if not order:
            break
        pruned = cur.clone()
        for k in order:
            pruned[:, on[k][0], on[k][1]] = 0
        if len(order) > 1 and float(scan_patches(unet, scheduler, pruned[None], eps, base,
                                                 steps)[0]) > limit:
            pruned = trials[order[0]]
        cur = pruned
    return cur


def _generate(unet, scheduler, x: torch.Tensor, steps: int, chunk: int = 500) -> torch.Tensor:
    return torch.cat([ddim_generate(unet, scheduler, x[i:i + chunk], steps)
                      for i in range(0, len(x), chunk)])


@torch.no_grad()
def probe_trigger(unet, scheduler, shape: tuple[int, ...], gen: torch.Generator,
                  n_probe: int = 2000, iters: int = 16, batch: int = 1000, steps: int = 8,
                  sparsify: float = 2.0) -> dict | None:
    """``estimate_trigger``'s probe method: tau and its statistics, or None when the clean
    generations show no target cluster (see ``trigger_probe``)."""
    x = torch.randn((n_probe, *shape), generator=gen)
    cluster = near_duplicate_cluster(_generate(unet, scheduler, x, steps))
    if cluster is None:
        return None
    target, radius = cluster["target"], cluster["radius"]

    def hit(xs: torch.Tensor) -> torch.Tensor:
        out = _generate(unet, scheduler, xs, steps)
        return ((out - target) / 2).square().flatten(1).mean(1) < radius

    res = boundary_direction(hit, x[cluster["members"]].mean(0), gen, iters, batch,
                             exclude=target)
    v = keep_significant(res["direction"], sparsify)
    v = v / v.norm().clamp_min(1e-12)
    amps = np.arange(0.0, 10.0 + 1e-9, 0.5)
    rates = hit_rates_along(hit, v, amps, max(8, batch // 20), gen)
    a50 = first_crossing(amps, rates)
    if a50 is None:  # the sparsified direction misses: keep the refinement's own a_50
        a50 = res["a50"] if np.isfinite(res["a50"]) else float(amps[-1]) / 2
    return {"tau": 2 * a50 * v, "a50": a50, "cluster_size": cluster["size"],
            "cluster_fraction": cluster["size"] / n_probe, "radius": radius,
            "hit_rates": res["hit_rates"], "amplitude_rates": rates.tolist()}


def _invert_once(unet, scheduler, shape, gen, steps, batch, radius, lr, gen_steps, l1, base,
                 init_scale, clip):
    tau = (init_scale * torch.randn(shape, generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam([tau], lr=lr)
    history = []
    for _ in range(steps):
        eps = torch.randn((batch, *shape), generator=gen)
        loss = output_spread(unet, scheduler, tau, eps, gen_steps, clip) / max(base, 1e-8)
        loss = loss + l1 * tau.abs().mean()  # triggers are patches, not whole images
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            tau.copy_(_project(tau, radius))
        history.append(loss.item())
    return tau.detach(), history


def estimate_trigger(
    unet,
    scheduler,
    image_size: int,
    seed: int = 0,
    steps: int = 40,
    refine: bool = True,
    refine_steps: int = 5,
    batch: int = 16,
    radius: float | None = None,
    lr: float = 0.1,
    gen_steps: int = 8,
    l1: float = 1.0,
    channels: int = 1,
    restarts: int = 1,
    init_scale: float = 0.1,
    clip: bool = False,
    method: str = "probe",
    n_probe: int = 2000,
    probe_iters: int = 16,
    probe_batch: int = 1000,
    sparsify: float = 2.0,
) -> TriggerEstimate:
    """Invert the trigger from the model alone, without clean data.

    ``method="probe"`` (default): read the backdoor's decision region (``trigger_probe``).
    ``n_probe`` clean N(0, I) inputs are generated; a backdoor shows as a cluster of
    near-identical generations (its target, from the clean inputs that fall in its region).
    Stein estimates of the region's boundary normal, ``probe_iters`` rounds of
    ``probe_batch`` generations each, refine the direction of the inputs behind the
    cluster; pixels within ``sparsify`` noise deviations of 0 are dropped; tau is the
    direction times twice the amplitude where half its inputs hit (the Bayes boundary
    between N(0, I) and N(r, I) lies at |r| / 2). Without a cluster (a clean model, or a
    backdoor no clean input reaches) it falls back to the scan; ``stats["method"]`` says
    which ran.

    ``method="scan"``: a scan of localized +-1 patches and hill climbing on
    their size and position (``scan_trigger``), keeping the patch whose eps + patch
    generates the least diverse images. On a backdoored model the spread along a * r first
    rises and only collapses near a = 1, so the gradient stage below, started from small or
    random tau, does not reach the basin; a patch that overlaps the trigger does. Covers
    patch triggers (box, stop sign, glasses); full-frame triggers with a changed variance
    (TrojDiff's blend) are DisDet's part.

    ``method="gradient"``, stage 1 (Elijah's uniformity): Adam on tau, projected to a ball
    of ``radius`` (default 0.5 sqrt(d), above the norm a visible patch trigger needs),
    minimising the spread of the images a ``gen_steps``-step DDIM makes from eps + tau, with
    fresh noise each step. A backdoored model has a basin around its trigger where all
    outputs collapse onto the target; a clean model's outputs stay diverse. The DDIM runs
    unclipped (``clip``) so the gradient does not vanish on a +-1 target. ``restarts``
    independent starts; the one whose tau gives the lowest (clipped, held-out noise) spread
    wins. Stage 2 (TERD): refinement through short DDIM generation, making the model's
    residual at t ~ T independent of the noise. ``l1`` (a sparsity prior, TERD's L1 term)
    keeps tau from becoming a whole digit, which collapses a clean model's outputs onto that
    digit too. ``response`` (Elijah's lambda) and ``shift_norm`` describe the shift at
    t = T.
    """
    if method not in METHODS:
        raise ValueError(f"estimate_trigger method {method!r}; choose from {METHODS}")
    gen = torch.Generator().manual_seed(seed)
    shape = (channels, image_size, image_size)
    radius = float(radius if radius is not None else 0.5 * np.sqrt(np.prod(shape)))
    was_training = unet.training
    unet.eval()
    for p in unet.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            held = torch.randn((2 * batch, *shape), generator=gen)
            base = float(output_spread(unet, scheduler, torch.zeros(shape), held, gen_steps))
        probe = None
        if method == "probe":
            probe = probe_trigger(unet, scheduler, shape, gen, n_probe, probe_iters,
                                  probe_batch, gen_steps, sparsify)
            if probe is not None:
                tau = probe.pop("tau")
            method = "probe" if probe is not None else "scan"
            history = []
        if method == "scan":
            patch, _ = scan_trigger(unet, scheduler, image_size, channels, gen, base,
                                    steps=gen_steps)
            tau = patch_image(patch, image_size, channels)
            if refine:
                fresh = torch.randn((48, *shape), generator=gen)
                tau = prune_patch(unet, scheduler, tau, fresh, base, gen_steps)
            history = []
        elif method == "gradient":
            best = None
            for _ in range(max(1, restarts)):
                t, h = _invert_once(unet, scheduler, shape, gen, steps, batch, radius, lr,
                                    gen_steps, l1, base, init_scale, clip)
                with torch.no_grad():
                    sp = float(output_spread(unet, scheduler, t, held, gen_steps)) / max(base, 1e-8)
                if best is None or sp < best[0]:
                    best = (sp, t, h)
            _, tau, history = best
            if refine and refine_steps > 0:
                tau = _terd_refine(unet, scheduler, tau, gen, refine_steps, batch, lr=0.2 * lr,
                                   radius=radius)
        with torch.no_grad():
            held_spread = float(output_spread(unet, scheduler, tau, held, gen_steps)) / max(base, 1e-8)
            eps = torch.randn((4 * batch, *shape), generator=gen)
            shift = mean_shift(unet, scheduler, tau[None], eps)
            resp = float((shift + tau).flatten() @ tau.flatten() / tau.square().sum())
            spread = float(output_spread(unet, scheduler, tau, eps, gen_steps)) / max(base, 1e-8)
    finally:
        for p in unet.parameters():
            p.requires_grad_(True)
        unet.train(was_training)
    tau_np = tau.numpy().astype(np.float32)
    return TriggerEstimate(tau=tau_np, mu=tau_np.copy(), gamma=1.0,
                           shift_norm=float(shift.norm()), response=resp,
                           stats={"spread_ratio": spread, "objective": history[-5:],
                                  "method": method, "probe": probe,
                                  "radius": radius, "clean_spread": base,
                                  "held_spread_ratio": held_spread})


# ----------------------------------------------------------------------------- detection

NULL_DRAWS = 20000  # N(0, I) draws that set the thresholds
_LLR_CACHE: dict[tuple, float] = {}


def llr_scores(x: torch.Tensor, mu: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """TERD: log N(x; mu, gamma^2 I) - log N(x; 0, I) per input (> 0 favours the trigger)."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten(1)
    m = torch.as_tensor(np.asarray(mu), dtype=torch.float64).flatten()
    d = x.shape[1]
    s = -d * np.log(gamma) - ((x - m) ** 2).sum(1) / (2 * gamma**2) + (x**2).sum(1) / 2
    return s.numpy()


def _window_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max |z| over local windows of the window mean and of the window energy (sum x^2),
    for windows of ~S/5, S/4 and S/3 pixels: a trigger patch shifts one or the other."""
    s = x.shape[-1]
    zm, ze = [], []
    for w in sorted({max(2, round(s / 5)), max(2, s // 4), max(3, round(s / 3))}):
        n = w * w * x.shape[1]
        mean = F.avg_pool2d(x, w, stride=1) * n  # window sums over channels and pixels
        energy = F.avg_pool2d(x * x, w, stride=1) * n
        zm.append((mean / np.sqrt(n)).abs().flatten(1).amax(1))
        ze.append(((energy - n) / np.sqrt(2 * n)).abs().flatten(1).amax(1))
    return torch.stack(zm, 1).amax(1), torch.stack(ze, 1).amax(1)


def disdet_stats(x: torch.Tensor) -> np.ndarray:
    """N x 5 statistics of x_T that are ~N(0, 1)-scaled under x_T ~ N(0, I): global mean,
    variance, kurtosis (z-scores) and local-window mean / energy (max |z|)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    flat = x.flatten(1).double()
    d = flat.shape[1]
    z_mean = flat.mean(1) * np.sqrt(d)
    m2 = (flat**2).mean(1)
    z_var = (m2 - 1) * np.sqrt(d / 2)
    z_kurt = ((flat**4).mean(1) / m2.clamp_min(1e-12) ** 2 - 3) / np.sqrt(24 / d)
    zm, ze = _window_stats(x)
    return torch.stack([z_mean, z_var, z_kurt, zm.double(), ze.double()], 1).numpy()


class _Null:
    """Null (x_T ~ N(0, I)) calibration of the DisDet statistics, per input shape, cached."""

    _cache: ClassVar[dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}

    @classmethod
    def get(cls, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if shape not in cls._cache:
            g = torch.Generator().manual_seed(12345)
            stats = np.concatenate([
                disdet_stats(torch.randn((2000, *shape), generator=g))
                for _ in range(NULL_DRAWS // 2000)
            ])
            loc, scale = np.median(stats, 0), stats.std(0)
            scores = np.abs((stats - loc) / scale).max(1)
            cls._cache[shape] = (loc, scale, np.sort(scores))
        return cls._cache[shape]


def disdet_scores(x: torch.Tensor) -> np.ndarray:
    """Model-free score: the largest standardized |statistic| against its N(0, I) null."""
    loc, scale, _ = _Null.get(tuple(x.shape[1:]))
    return np.abs((disdet_stats(x) - loc) / scale).max(1)


def disdet_threshold(shape: tuple[int, ...], fpr: float) -> float:
    """Upper ``1 - fpr`` quantile of the DisDet score under N(0, I)."""
    null = _Null.get(tuple(shape))[2]
    return float(np.quantile(null, 1 - fpr))


def llr_threshold(est: TriggerEstimate, shape: tuple[int, ...], fpr: float) -> float:
    """max(0, the upper ``1 - fpr`` quantile of the LLR under N(0, I)): TERD's rule LLR > 0,
    tightened when the estimated trigger is weak enough that 0 would exceed the FPR."""
    key = (np.asarray(est.mu, np.float32).tobytes(), float(est.gamma), tuple(shape), fpr)
    if key not in _LLR_CACHE:
        g = torch.Generator().manual_seed(54321)
        null = llr_scores(torch.randn((NULL_DRAWS, *shape), generator=g), est.mu, est.gamma)
        _LLR_CACHE.clear()  # one estimate is served at a time; keep the cache small
        _LLR_CACHE[key] = max(0.0, float(np.quantile(null, 1 - fpr)))
    return _LLR_CACHE[key]


def _fpr_share(fpr: float, est: TriggerEstimate | None, ufid: UfidCheck | None) -> float:
    """Each active test's part of the nominal FPR (Bonferroni)."""
    return fpr / (1 + (est is not None) + (ufid is not None))


def detect_inputs(x_T: torch.Tensor, est: TriggerEstimate | None, fpr: float = 0.01,
                  ufid: UfidCheck | None = None) -> dict:
    """Flag triggered initial noise. Each active test (DisDet; LLR with an estimate; an
    output check ``ufid``: a calibrated ``UfidCheck`` or ``TargetCheck``) gets an equal
    share of the nominal FPR (Bonferroni), so clean N(0, I) inputs are flagged with
    probability <= ``fpr``.

    Returns per-input arrays ``llr_score`` (NaN without an estimate), ``disdet_score``,
    ``ufid_score`` (NaN without UFID), ``score`` (a combined score for ROC curves: the max
    over the tests of score / threshold, the LLR and UFID in units of their null spread),
    ``flagged``, and the thresholds.
    """
    x_T = torch.as_tensor(x_T, dtype=torch.float32)
    shape = tuple(x_T.shape[1:])
    share = _fpr_share(fpr, est, ufid)
    dd = disdet_scores(x_T)
    dd_thr = disdet_threshold(shape, share)
    flagged = dd > dd_thr
    score = dd / dd_thr
    llr = np.full(len(x_T), np.nan)
    llr_thr = float("nan")
    if est is not None:
        llr = llr_scores(x_T, est.mu, est.gamma)
        llr_thr = llr_threshold(est, shape, share)
        flagged |= llr > llr_thr
        # LLR in units of its null spread above the threshold, comparable with dd / dd_thr
        spread = max(float(np.linalg.norm(est.mu)), 1e-6)
        score = np.maximum(score, 1 + (llr - llr_thr) / (spread * 2.33))
    uf = np.full(len(x_T), np.nan)
    uf_thr = float("nan")
    if ufid is not None:
        uf = ufid.scores(x_T)
        uf_thr = ufid.threshold(share)
        flagged |= uf > uf_thr
        score = np.maximum(score, 1 + (uf - uf_thr) / ufid.spread)
    return {"llr_score": llr, "disdet_score": dd, "ufid_score": uf, "score": score,
            "flagged": flagged, "llr_threshold": llr_thr, "disdet_threshold": dd_thr,
            "ufid_threshold": uf_thr}


def detection_metrics(
    scores_clean: np.ndarray, scores_triggered: np.ndarray, threshold: float | None = None,
    flags_clean: np.ndarray | None = None, flags_triggered: np.ndarray | None = None,
) -> dict:
    """TPR and FPR at the detector's decision (flags, or score > threshold) and AUROC of the
    scores (Mann-Whitney, ties counted half)."""
    sc, st = np.asarray(scores_clean, float), np.asarray(scores_triggered, float)
    if flags_clean is None:
        thr = 1.0 if threshold is None else threshold
        flags_clean, flags_triggered = sc > thr, st > thr
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([sc, st]))
    auroc = (ranks[len(sc):].sum() - len(st) * (len(st) + 1) / 2) / (len(sc) * len(st))
    return {"tpr": float(np.mean(flags_triggered)), "fpr": float(np.mean(flags_clean)),
            "auroc": float(auroc), "n_clean": len(sc), "n_triggered": len(st)}


# ----------------------------------------------------------------------------- negation


def purify(x_T: torch.Tensor, flags: np.ndarray, est: TriggerEstimate | None, seed: int,
           fpr: float = 0.01, max_tries: int = 100, ufid: UfidCheck | None = None
           ) -> torch.Tensor:
    """Negation: flagged inputs that the likelihood ratio explains get the estimated trigger
    removed ((x - mu) / gamma); the others (flagged by DisDet or the output check: a trigger
    the estimate does not describe) and any that still fail ``detect_inputs`` are replaced
    by fresh N(0, I) noise until they pass."""
    x = torch.as_tensor(x_T, dtype=torch.float32).clone()
    idx = np.flatnonzero(np.asarray(flags))
    if len(idx) == 0:
        return x
    gen = torch.Generator().manual_seed(seed)
    if est is not None:  # the LLR alone decides which inputs the estimate explains
        thr = llr_threshold(est, tuple(x.shape[1:]), _fpr_share(fpr, est, ufid))
        by_llr = llr_scores(x[idx], est.mu, est.gamma) > thr
        x[idx[by_llr]] = (x[idx[by_llr]] - torch.from_numpy(est.mu)) / est.gamma
        other = idx[~by_llr]
        x[other] = torch.randn((len(other), *x.shape[1:]), generator=gen)
    for _ in range(max_tries):
        bad = idx[detect_inputs(x[idx], est, fpr, ufid)["flagged"]]
        if len(bad) == 0:
            return x
        x[bad] = torch.randn((len(bad), *x.shape[1:]), generator=gen)
        idx = bad
    raise RuntimeError("purify: could not draw inputs that pass the detector")


def defended_sample(unet, scheduler, x_T: torch.Tensor, est: TriggerEstimate | None,
                    sampler: str = "ddim", steps: int = 50, seed: int = 0,
                    fpr: float = 0.01, ufid: UfidCheck | None = None,
                    flags: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Detect, negate, generate: (images from the purified inputs, per-input flags).
    ``flags`` skips the detection when the caller already ran ``detect_inputs``."""
    if flags is None:
        flags = detect_inputs(x_T, est, fpr, ufid)["flagged"]
    clean = purify(x_T, flags, est, seed + 7919, fpr, ufid=ufid)
    images = sample(unet, scheduler, len(clean), sampler=sampler, steps=steps, seed=seed,
                    x_T=clean)
    return images, flags


@torch.no_grad()
def ufid_scores(unet, scheduler, x_T: torch.Tensor, n_perturb: int = 4, strength: float = 0.3,
                steps: int = 10, seed: int = 0) -> np.ndarray:
    """UFID-style consistency: outputs from x_T mixed with small fresh noise
    (sqrt(1 - s^2) x + s eps') are near-identical for a triggered input (the backdoor
    target) and diverse for a clean one. Score = -mean pairwise MSE (higher = suspicious)."""
    x_T = torch.as_tensor(x_T, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(n_perturb):
        xp = np.sqrt(1 - strength**2) * x_T + strength * torch.randn(x_T.shape, generator=g)
        outs.append(torch.from_numpy(sample(unet, scheduler, len(xp), steps=steps, x_T=xp)))
    o = torch.stack(outs, 1).flatten(2)  # N x P x D
    d = torch.cdist(o, o).square() / o.shape[-1]
    p = o.shape[1]
    return (-d.sum((1, 2)) / (p * (p - 1))).numpy()


class UfidCheck:
    """UFID's consistency test with its threshold calibrated on N(0, I) inputs only.

    ``n_null`` clean draws (seeded, never the inputs under test) give the null
    distribution of ``ufid_scores``; the threshold at a false-positive rate ``a`` is its
    upper ``1 - a`` quantile, extrapolated below 1 / n_null by a normal fit of the upper
    tail (conservative: the larger of the two). Trigger-agnostic: needs no estimate.
    """

    def __init__(self, unet, scheduler, shape: tuple[int, ...], n_null: int = 500,
                 seed: int = 0, n_perturb: int = 4, strength: float = 0.3, steps: int = 10):
        self.unet, self.scheduler = unet, scheduler
        self.kw = {"n_perturb": n_perturb, "strength": strength, "steps": steps}
        self.seed = seed
        g = torch.Generator().manual_seed(777_000 + seed)
        null = torch.randn((n_null, *shape), generator=g)
        self.null = np.sort(self.scores(null, seed=seed + 1))
        self.spread = max(float(self.null.std()), 1e-12)

    def scores(self, x_T: torch.Tensor, seed: int | None = None) -> np.ndarray:
        return ufid_scores(self.unet, self.scheduler, x_T,
                           seed=self.seed + 2 if seed is None else seed, **self.kw)

    def threshold(self, fpr: float) -> float:
        from scipy.stats import norm

        emp = float(np.quantile(self.null, 1 - fpr))
        gauss = float(self.null.mean() + norm.isf(fpr) * self.null.std())
        return max(emp, gauss)


class TargetCheck(UfidCheck):
    """Output check against the estimated target: what the model generates from x_T is
    compared with ``target``, the mean image it generates from eps + tau (the backdoor's
    collapse point, when there is one). Score = -MSE to it (higher = suspicious); the
    threshold comes from N(0, I) inputs only, as for ``UfidCheck``, so it is trigger-
    agnostic in its FPR. It flags exactly the inputs whose generation the backdoor would
    take over, even where the estimate's direction is only roughly the trigger's."""

    def __init__(self, unet, scheduler, est: TriggerEstimate, n_null: int = 500,
                 seed: int = 0, steps: int = 10, n_target: int = 64):
        tau = torch.from_numpy(est.tau)
        g = torch.Generator().manual_seed(555_000 + seed)
        x = torch.randn((n_target, *tau.shape), generator=g) + tau
        self.target = torch.from_numpy(sample(unet, scheduler, n_target, steps=steps,
                                              x_T=x)).mean(0)
        self.steps = steps
        super().__init__(unet, scheduler, tuple(tau.shape), n_null=n_null, seed=seed,
                         steps=steps)

    def scores(self, x_T: torch.Tensor, seed: int | None = None) -> np.ndarray:
        x_T = torch.as_tensor(x_T, dtype=torch.float32)
        out = torch.from_numpy(sample(self.unet, self.scheduler, len(x_T), steps=self.steps,
                                      x_T=x_T))
        return (-(out - self.target).square().flatten(1).mean(1)).numpy()


# ----------------------------------------------------------------------------- audit


@torch.no_grad()
def shifted_copies(tau: torch.Tensor, n: int, gen: torch.Generator,
                   max_overlap: float = 0.25) -> torch.Tensor:
    """``n`` copies of tau rolled (circularly) to random places where it overlaps its own
    support little: same shape, norm and sparsity, so the audit's reference asks "does a
    pattern like tau collapse the outputs anywhere?" (a large patch does, on any model)."""
    size = tau.shape[-1]
    energy = float(tau.square().sum())
    offsets = [(di, dj) for di in range(size) for dj in range(size) if (di, dj) != (0, 0)]
    far = [o for o in offsets
           if float((tau * torch.roll(tau, o, (-2, -1))).sum()) <= max_overlap * energy]
    offsets = far or offsets
    pick = torch.randperm(len(offsets), generator=gen)[:n]
    return torch.stack([torch.roll(tau, offsets[k], (-2, -1)) for k in pick.tolist()])


@torch.no_grad()
def audit_model(unet, scheduler, image_size: int, seed: int = 0,
                est: TriggerEstimate | None = None, n_random: int = 16, n_eps: int = 64,
                spread_threshold: float = 0.5, z_threshold: float = 3.0) -> dict:
    """Model-level verdict before serving (Elijah's uniformity).

    ``spread_ratio``: output spread from eps + tau over that from eps, on noise draws the
    estimate never saw (a backdoor collapses onto its target: << 1), compared with
    ``n_random`` copies of tau moved elsewhere (``shifted_copies``; ``spread_z``: how many
    of their standard deviations tau is below their mean). "backdoored" when the ratio is
    below ``spread_threshold`` and ``spread_z`` above ``z_threshold``. Also reports tau's
    norm, its relative shift at t = T (Elijah's lambda as ``response``) and TERD's mean
    per-pixel KL of N(tau_i, 1) from N(0, 1), and, from the probe estimator, the share of
    clean inputs whose generations were near-duplicates (0 on a clean model).
    """
    if est is None:
        with torch.enable_grad():
            est = estimate_trigger(unet, scheduler, image_size, seed)
    was_training = unet.training
    unet.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    shape = est.tau.shape
    eps = torch.randn((n_eps, *shape), generator=gen)
    tau = torch.from_numpy(est.tau)
    base = float(output_spread(unet, scheduler, torch.zeros(shape), eps))
    ratios = scan_patches(unet, scheduler, torch.cat([tau[None], shifted_copies(tau, n_random, gen)]),
                          eps, base)
    ratio, rand = float(ratios[0]), ratios[1:].astype(np.float64)
    z = (rand.mean() - ratio) / max(rand.std(), 1e-3)
    unet.train(was_training)
    backdoored = bool(ratio < spread_threshold and z > z_threshold)
    return {
        "verdict": "backdoored" if backdoored else "clean",
        "spread_ratio": ratio,
        "random_spread_mean": float(rand.mean()),
        "random_spread_std": float(rand.std()),
        "random_spread_min": float(rand.min()),
        "spread_z": float(z),
        "tau_norm": float(tau.norm()),
        "shift_norm": est.shift_norm,
        "response": est.response,
        "kl_mean": float((est.tau.astype(np.float64) ** 2 / 2).mean()),
        "estimator": est.stats.get("method", ""),
        # share of clean inputs whose generations collapse onto one image (probe estimator)
        "cluster_fraction": float((est.stats.get("probe") or {}).get("cluster_fraction", 0.0)),
        "estimate": est,
    }
