"""The public API: ``run(cfg)`` trains a federated DDPM and returns its summary.

This is the outer shell: it starts (or joins) Ray and drives the actors.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from ssdiff_ray import config as config_mod
from ssdiff_ray.config import Config


def init_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join ``address`` (or RAY_ADDRESS), else start an embedded local Ray.

    Returns True when this call started Ray (so the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ConnectionError(f"cannot reach the Ray cluster at {address!r}: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    else:
        # The embedded default needs no dashboard or its agents: fewer processes, less RAM.
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    return True


def flops_per_sample_step(cfg: Config) -> float:
    """Training FLOPs per sample per local step (3x the forward pass)."""
    import torch

    from ssdiff_ray.energy import forward_flops
    from ssdiff_ray.model import build_unet

    unet = build_unet(cfg.model.preset, cfg.data.image_size)
    x = torch.zeros(1, 1, cfg.data.image_size, cfg.data.image_size)
    return 3.0 * forward_flops(unet, (x, torch.zeros(1, dtype=torch.long)))


def run(
    cfg: Config,
    *,
    address: str | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    on_round=None,
) -> dict:
    """Run (or resume) a federated training run; returns the summary dict.

    ``on_round(federation, round, row)`` is called after each round (tests, tuning).
    """
    import ray
    from tqdm import tqdm

    from actors.loop import Federation
    from ssdiff_ray.policies import make_policy
    from ssdiff_ray.runtime import new_run_dir, prepare, write_summary

    t_start = time.perf_counter()
    run_dir = Path(resume) if resume else new_run_dir(cfg)
    prep = prepare(cfg, run_dir)  # shards and population are rebuilt identically on resume
    started = init_ray(address or cfg.ray.address)
    fed = None
    try:
        policy = make_policy(cfg)
        fed = Federation(cfg, prep, policy)  # FLOPs per step come from the server
        start = 1
        if resume and (run_dir / "checkpoint.pkl").exists():
            start = fed.restore(run_dir) + 1
        summary: dict = {"run_dir": str(run_dir), "num_params": fed.num_params,
                         "pools": fed.num_pools, "clients": cfg.clients.count}
        if cfg.eval.baseline and start == 1:
            summary["fid_untrained"] = fed.evaluate(0, untrained=True)["fid"]
            summary["fid_floor"] = fed.fid_floor()
        bar = tqdm(total=cfg.rounds, initial=start - 1, disable=not progress, unit="round",
                   desc="federated", dynamic_ncols=True)
        for r in range(start, cfg.rounds + 1):
            row = fed.run_round(r)
            every = cfg.eval.every
            if r == cfg.rounds or (every > 0 and r % every == 0):
                row.update(fed.evaluate(r))
            if cfg.server.checkpoint_every and r % cfg.server.checkpoint_every == 0:
                fed.checkpoint()
            bar.set_postfix(loss=f"{row['loss']:.4f}", fid=f"{row.get('fid', math.nan):.2f}",
                            refresh=False)
            bar.update(1)
            if on_round is not None:
                on_round(fed, r, row)
        bar.close()
        fed.checkpoint()
        fed.save_model()
        rounds = fed.ledger.rounds()
        last = rounds.iloc[-1]
        summary.update({
            "rounds": int(cfg.rounds), "wall_s": time.perf_counter() - t_start,
            "fid": float(last.get("fid", math.nan)),
            "confidence": float(last.get("confidence", math.nan)),
            "classes_present": int(last.get("classes_present", 0) or 0),
            "uplink_bytes": int(rounds["uplink_bytes"].sum()),
            "downlink_bytes": int(rounds["downlink_bytes"].sum()),
            "energy_j": float(rounds["energy_j"].sum()),
            "stragglers": int(rounds["stragglers"].sum()),
            "final_loss": float(last["loss"]),
        })
        write_summary(run_dir, summary)
        return summary
    finally:
        if fed is not None:
            fed.shutdown()
        if started:
            ray.shutdown()


def load_config(path: str | None, overrides: list[str]) -> Config:
    return config_mod.load(path, overrides)
