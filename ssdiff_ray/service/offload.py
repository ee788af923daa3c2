"""Where and how to generate a request: the cheapest (sampler, steps, place) in the model's
profile that meets the request's quality floor within its latency and energy budgets.

Two places, as in the edge-AIGC offloading papers (e.g. Du et al., "Enabling AI-generated
content services in wireless edge networks", 2023; Xu et al., "Joint foundation model
caching and inference of generative AI services for edge intelligence", 2023):

* ``device``: the requesting device runs the sampler itself. Its compute time and energy
  come from the device model (``ssdiff_ray.devices``, as for training): cycles = FLOPs /
  FLOPs per cycle, at the lowest DVFS frequency that meets the latency budget (the energy
  of both CPU and accelerator classes grows with f).
* ``edge``: the device sends the request and receives the PNGs; the edge server runs the
  sampler. Device energy = transmit + receive; latency = uplink + the server's time for
  the images already queued and this request's (measured in the profile) + downlink.

The radio is the run's own cell (``[devices]``) at a nominal distance (the mean distance
to the access point at the cell's centre), no shadowing, mean fading, the device at its
highest transmit power and alone on the band. The service computes the images in both
cases; ``where`` is the decision a deployment would follow and the figures are predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ssdiff_ray.devices import DEVICE_CLASSES, DeviceClass
from ssdiff_ray.energy import ACCEL_POWER_EXPONENT, ChannelConfig, path_loss_db, rate_bps
from ssdiff_ray.errors import UserError


class LatencyScale:
    """How much longer the replica's recent requests took than predicted. The profile
    times a quiet machine; under load a request also waits for the batch in progress and
    finishes with its whole batch, and the HTTP proxy and clients share the cores. The
    planner adds the 95th percentile of recent (observed - predicted) server seconds to its
    prediction (0 until ``min_samples`` are seen), so a budget holds for 95% of requests at
    the load the replica actually sees. (Additive: a ratio swung from 1.7 to 3 with the
    queue position inside one batch that all finished together.)"""

    def __init__(self, window: int = 100, min_samples: int = 16):
        from collections import deque

        self.residuals: deque[float] = deque(maxlen=window)
        self.min_samples = min_samples

    def record(self, predicted_s: float, observed_s: float) -> None:
        if np.isfinite(predicted_s):
            self.residuals.append(observed_s - predicted_s)

    def value(self) -> float:
        """Seconds to add to a predicted server time."""
        if len(self.residuals) < self.min_samples:
            return 0.0
        return max(0.0, float(np.percentile(np.fromiter(self.residuals, float), 95)))


class Infeasible(UserError):
    """No setting meets the budget; ``nearest`` is the cheapest budget that would."""

    def __init__(self, message: str, nearest: dict):
        super().__init__(message)
        self.nearest = nearest


@dataclass
class Plan:
    sampler: str
    steps: int
    where: str                 # "device" or "edge"
    latency_s: float           # predicted, end to end for the requesting device
    energy_j: float            # predicted device energy (server energy when no device named)
    server_energy_j: float
    quality: float | None
    fid: float | None
    cpu_hz: float | None = None  # the device's DVFS frequency when it runs the sampler
    server_s: float = 0.0        # the edge server's part of latency_s (queue included)
    radio_s: float = 0.0         # the radio's part of latency_s


@dataclass(frozen=True)
class EdgeServer:
    power_w: float = 65.0          # an edge server's CPU package power under load (x86, 65 W TDP)
    request_bytes: int = 256       # a JSON request without noise
    distance_frac: float = 0.383   # nominal device distance / cell side: the mean distance from
                                   # the centre of a square to a uniform point in it


def device_costs(dev: DeviceClass, flops: float, latency_s: float | None) -> tuple[float, float, float]:
    """(seconds, joules, Hz) for the device to compute ``flops``, at the lowest frequency in
    its DVFS range that finishes within ``latency_s`` (its highest when none can)."""
    cycles = flops / dev.flops_per_cycle
    f = dev.cpu_hz_min if latency_s is None else cycles / latency_s
    f = float(np.clip(f, dev.cpu_hz_min, dev.cpu_hz_max))
    if dev.accelerator:
        energy = dev.accel_power_w / dev.cpu_hz_max ** ACCEL_POWER_EXPONENT * cycles * f
    else:
        energy = dev.kappa * cycles * f ** 2
    return cycles / f, energy, f


def radio_costs(dev: DeviceClass, up_bytes: float, down_bytes: float, link: ChannelConfig,
                server: EdgeServer) -> tuple[float, float]:
    """(seconds, device joules) to send ``up_bytes`` and receive ``down_bytes``."""
    gain = 10 ** (-path_loss_db(max(server.distance_frac * link.cell_m, 10.0)) / 10)
    up_bps = float(rate_bps(link.bandwidth_hz, dev.tx_power_w_max, gain, link.noise_dbm_per_hz))
    up_s, down_s = 8 * up_bytes / up_bps, 8 * down_bytes / link.downlink_rate_bps
    return up_s + down_s, dev.tx_power_w_max * up_s + link.rx_power_w * down_s


def options(n: int, profile: pd.DataFrame, dev: DeviceClass | None, link: ChannelConfig,
            image_bytes: float, queued_images: int, latency_s: float | None,
            model_bytes: int, server: EdgeServer = EdgeServer(),
            server_extra_s: float = 0.0) -> pd.DataFrame:
    """Every (sampler, steps, where) with its predicted latency and energy for this request;
    ``server_extra_s`` is added to the profile's server time (``LatencyScale``)."""
    rows = []
    for r in profile.itertuples():
        server_s = r.server_s0 + r.server_s_per_image * (queued_images + n) + server_extra_s
        server_j = server.power_w * r.server_s_per_image * n
        base = {"sampler": r.sampler, "steps": int(r.steps), "quality": r.quality, "fid": r.fid,
                "server_energy_j": server_j, "server_s": server_s, "radio_s": 0.0}
        if dev is None:
            rows.append({**base, "where": "edge", "latency_s": server_s, "energy_j": server_j,
                         "cpu_hz": None})
            continue
        radio_s, radio_j = radio_costs(dev, server.request_bytes, n * image_bytes, link, server)
        rows.append({**base, "where": "edge", "latency_s": server_s + radio_s,
                     "energy_j": radio_j, "cpu_hz": None, "radio_s": radio_s})
        if model_bytes <= dev.memory_bytes:
            s, j, f = device_costs(dev, n * r.flops_per_image, latency_s)
            rows.append({**base, "where": "device", "latency_s": s, "energy_j": j,
                         "server_energy_j": 0.0, "server_s": 0.0, "cpu_hz": f})
    return pd.DataFrame(rows)


def plan_request(req, profile: pd.DataFrame, link: ChannelConfig, image_bytes: float,
                 queued_images: int, model_bytes: int, server: EdgeServer = EdgeServer(),
                 server_extra_s: float = 0.0) -> Plan:
    """The plan for a budgeted request (the cheapest feasible option in device energy, then
    latency), or for an explicit one (its sampler and steps on the edge server); raises
    ``Infeasible`` with the nearest budget that is."""
    dev = DEVICE_CLASSES[req.device_class] if req.device_class else None
    opts = options(req.n, profile, dev, link, image_bytes, queued_images, req.latency_s,
                   model_bytes, server, server_extra_s)
    if not req.budgeted:
        pick = opts[(opts["sampler"] == req.sampler) & (opts["steps"] == req.steps)
                    & (opts["where"] == "edge")]
        if pick.empty:  # a setting the profile did not measure: no prediction
            return Plan(req.sampler, req.steps, "edge", math.nan, math.nan, math.nan, None, None,
                        server_s=math.nan, radio_s=math.nan)
        return Plan(**_plan_fields(pick.iloc[0]))
    floor = req.min_quality or 0.0
    good = opts[opts["quality"] >= floor - 1e-12]
    ok = good
    if req.latency_s is not None:
        ok = ok[ok["latency_s"] <= req.latency_s]
    if req.energy_j is not None:
        ok = ok[ok["energy_j"] <= req.energy_j]
    if not ok.empty:
        best = ok.sort_values(["energy_j", "latency_s"]).iloc[0]
        return Plan(**_plan_fields(best))
    over = np.maximum(good["latency_s"] / (req.latency_s or np.inf),
                      good["energy_j"] / (req.energy_j or np.inf))
    near = good.loc[over.idxmin()]
    nearest = {"latency_s": float(near["latency_s"]), "energy_j": float(near["energy_j"]),
               "min_quality": req.min_quality, "sampler": near["sampler"],
               "steps": int(near["steps"]), "where": near["where"]}
    asked = ", ".join(f"{k} = {v:g}" for k, v in (("latency_s", req.latency_s),
                      ("energy_j", req.energy_j), ("min_quality", req.min_quality)) if v is not None)
    raise Infeasible(f"no sampler and steps meet {asked} for {req.n} image(s) on a "
                     f"{req.device_class}; nearest feasible: latency_s >= "
                     f"{nearest['latency_s']:.3g}, energy_j >= {nearest['energy_j']:.3g} "
                     f"({near['sampler']} {int(near['steps'])} steps on the {near['where']})",
                     nearest)


def _plan_fields(row: pd.Series) -> dict:
    cpu = row.get("cpu_hz")
    return {"sampler": row["sampler"], "steps": int(row["steps"]), "where": row["where"],
            "latency_s": float(row["latency_s"]), "energy_j": float(row["energy_j"]),
            "server_energy_j": float(row["server_energy_j"]), "quality": float(row["quality"]),
            "fid": float(row["fid"]), "cpu_hz": None if cpu is None or pd.isna(cpu) else float(cpu),
            "server_s": float(row["server_s"]), "radio_s": float(row["radio_s"])}
