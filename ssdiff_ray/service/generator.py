"""The served model: checks a request, plans it and generates batches of requests with the
defense in the loop. No Ray here: the Serve deployment (``service/app.py``) wraps one
``Generator`` per replica, and tests can call it directly.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import numpy as np
import torch

from ssdiff_ray.energy import ChannelConfig
from ssdiff_ray.errors import UserError
from ssdiff_ray.service.offload import LatencyScale, Plan, plan_request
from ssdiff_ray.service.profile import load_profile
from ssdiff_ray.service.request import GenerateRequest, Limits, ModelInfo, RequestError, parse_generate


def _finite(v: float | None) -> float | None:
    """JSON has no NaN: an unpredicted figure is null."""
    return None if v is None or not np.isfinite(v) else float(v)


class BackdooredModelError(UserError):
    """The run's audit says "backdoored" and the operator did not allow serving it."""


class Generator:
    """One run's model with its cached defense, audit and serve profile."""

    def __init__(self, run_dir: str | Path, *, defend: bool = True, allow_backdoored: bool = False,
                 limits: Limits | None = None, device: str = "cpu", log=None):
        from ssdiff_ray.defense.cache import cached_defense
        from ssdiff_ray.defense.defense import Defense
        from ssdiff_ray.inference import class_names, load_run_model

        self.run_dir = Path(run_dir)
        self.cfg, self.unet, self.scheduler = load_run_model(self.run_dir)
        self.unet.to(device).eval()
        self.defense, self.audit = cached_defense(
            self.run_dir, Defense.from_config(self.cfg, self.unet, self.scheduler), log=log)
        if self.audit.get("verdict") == "backdoored" and not allow_backdoored:
            raise BackdooredModelError(
                f"{self.run_dir}: the audit says the model is backdoored (spread ratio "
                f"{self.audit.get('spread_ratio', float('nan')):.3g}); refusing to serve it "
                "(--allow-backdoored serves it with the input defense)")
        self.defend, self.limits = defend, limits or Limits()
        c, e = self.cfg, self.cfg.eval
        self.info = ModelInfo(channels=self.unet.config.in_channels, image_size=c.data.image_size,
                              conditional=c.model.conditional,
                              class_names=tuple(class_names(self.run_dir, c)),
                              timesteps=int(self.scheduler.config.num_train_timesteps),
                              sampler=e.sampler, steps=e.steps, guidance=e.guidance)
        self.profile = load_profile(self.run_dir)
        self.latency = LatencyScale()  # the service records observed server times
        self.link = ChannelConfig.from_config(c.devices)
        self.model_bytes = 4 * sum(p.numel() for p in self.unet.parameters())
        # PNG bytes of one image, for the downlink: the profile's grid is not the served
        # size, so measure one image of noise (an upper bound: noise compresses worst)
        from ssdiff_ray.images import to_png

        s = c.data.image_size
        self.image_bytes = len(to_png(np.random.default_rng(0).uniform(-1, 1, (self.info.channels, s, s))))

    def parse(self, body: bytes) -> GenerateRequest:
        """``parse_generate`` against this model and limits."""
        return parse_generate(body, self.info, self.limits)

    def plan(self, req: GenerateRequest, queued_images: int = 0) -> Plan:
        """How and where to run ``req``; budgeted requests need the serve profile."""
        if self.profile is None:
            if req.budgeted:
                raise RequestError(422, "budgeted requests need the model's serve profile: "
                                        f"run `ssdiff serve-profile {self.run_dir}` first")
            nan = float("nan")
            return Plan(req.sampler, req.steps, "edge", nan, nan, nan, None, None,
                        server_s=nan, radio_s=nan)
        return plan_request(req, self.profile, self.link, self.image_bytes, queued_images,
                            self.model_bytes, server_extra_s=self.latency.value())

    def warm_up(self, batch: int = 8) -> None:
        """One small batch and one of ``batch`` images through the served path: the first
        calls of a fresh process are several times slower (allocations, kernel choice), and
        its requests would otherwise pay for them."""
        for n in (1, batch):
            req = GenerateRequest(n=n, sampler="ddim", steps=2, guidance=self.info.guidance)
            self.generate([(req, self.plan(req))])

    def initial_noise(self, req: GenerateRequest) -> torch.Tensor:
        if req.noise is not None:
            return torch.from_numpy(req.noise)
        s = self.info.image_size
        return torch.randn((req.n, self.info.channels, s, s),
                           generator=torch.Generator().manual_seed(req.seed))

    def generate(self, items: list[tuple[GenerateRequest, Plan]]) -> list[dict]:
        """One response per (request, plan), generating every group of requests that share
        sampler, steps, guidance and conditioning as one batch."""
        from ssdiff_ray.images import to_png

        t0 = time.perf_counter()
        groups: dict[tuple, list[int]] = {}
        for i, (req, plan) in enumerate(items):
            key = (plan.sampler, plan.steps, req.guidance, req.label is None)
            groups.setdefault(key, []).append(i)
        out: list[dict | None] = [None] * len(items)
        for (sampler, steps, guidance, uncond), idx in groups.items():
            reqs = [items[i][0] for i in idx]
            x = torch.cat([self.initial_noise(r) for r in reqs])
            labels = None if uncond else np.concatenate([np.full(r.n, r.label) for r in reqs])
            images, flags = self._sample(x, labels, guidance, sampler, steps, reqs[0].seed)
            start = 0
            for i, r in zip(idx, reqs, strict=True):
                plan = items[i][1]
                meta = {"sampler": sampler, "steps": steps, "where": plan.where,
                        "predicted_latency_s": _finite(plan.latency_s),
                        "predicted_energy_j": _finite(plan.energy_j),
                        "predicted_server_energy_j": _finite(plan.server_energy_j),
                        "predicted_server_s": _finite(plan.server_s),
                        "predicted_radio_s": _finite(plan.radio_s),
                        "quality": plan.quality, "cpu_hz": plan.cpu_hz,
                        "class": None if r.label is None else self.info.class_names[r.label]}
                out[i] = {"images": [
                    {"png": base64.b64encode(to_png(images[start + j])).decode(),
                     "flagged": bool(flags[start + j]), "negated": bool(flags[start + j]),
                     "seed": r.seed, "index": j, **meta} for j in range(r.n)],
                    "batch_requests": len(items), "batch_images": int(len(x))}
                start += r.n
        server_s = time.perf_counter() - t0
        for o in out:
            o["server_s"] = server_s
        return out

    def _sample(self, x, labels, guidance, sampler, steps, seed) -> tuple[np.ndarray, np.ndarray]:
        """(images, flags): the input tests flag, negation cleans, then the sampler runs."""
        from ssdiff_ray.model.sampling import sample

        if not self.defend:
            images = sample(self.unet, self.scheduler, len(x), sampler=sampler, steps=steps,
                            seed=seed, x_T=x, labels=labels, guidance=guidance)
            return images, np.zeros(len(x), bool)
        flags = self.defense.detect(x)["flagged"]
        images, _ = self.defense.sample(x, flags=flags, labels=labels, guidance=guidance,
                                        sampler=sampler, steps=steps, seed=seed)
        return images, flags

    def model_card(self) -> dict:
        """``GET /model``: what is served, its audit, limits and profile."""
        from dataclasses import asdict

        from ssdiff_ray.devices import DEVICE_CLASSES
        from ssdiff_ray.model import SAMPLERS

        prof = None
        if self.profile is not None:
            prof = self.profile[["sampler", "steps", "fid", "quality", "server_s_per_image",
                                 "flops_per_image"]].to_dict("records")
        c = self.cfg
        return {"run": Path(self.run_dir).name, "preset": c.model.preset,  # no host path
                "parameters": self.model_bytes // 4, "data": c.data.name,
                "image_size": self.info.image_size, "channels": self.info.channels,
                "conditional": self.info.conditional, "classes": list(self.info.class_names),
                "defense": self.defend, "audit": self.audit,
                "defaults": {"sampler": self.info.sampler, "steps": self.info.steps,
                             "guidance": self.info.guidance},
                "samplers": list(SAMPLERS), "device_classes": list(DEVICE_CLASSES),
                "limits": asdict(self.limits),
                "profile": prof}
