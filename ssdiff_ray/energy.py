"""Wireless uplink channel, per-round time/energy cost model, and training-FLOP estimates.

Channel (3GPP TR 36.814 macro-cell model, as in Yang et al., IEEE TWC 2021):
``PL(dB) = 128.1 + 37.6 log10(d_km)`` plus the client's fixed log-normal shadowing (positive
``shadowing_db`` = extra loss), times per-round Rayleigh fading ``|h|^2 ~ Exp(1)``. The uplink
band ``B`` is shared equally by the round's uploading clients (FDMA), and client i gets
``r_i = B_i log2(1 + p_i h_i / (N0 B_i))``.

Compute model: see ``ssdiff_ray.devices``. Both device kinds reduce to
``compute_energy_j = coeff * cycles * f**exponent``: CPU classes ``kappa * cycles * f^2``;
accelerator classes ``accel_power_w * (f/f_max)^2 * cycles/f = (accel_power_w/f_max^2) * cycles * f``.
Core module: no ray, no optuna (torch is imported lazily, only by the FLOP counters).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ssdiff_ray.devices import dbm_to_w

__all__ = [
    "ChannelConfig", "channel_gain", "compute_energy_j", "compute_energy_model", "compute_s",
    "dbm_to_w", "draw_round_channel", "forward_flops", "path_loss_db", "rate_bps",
    "round_costs", "share_bandwidth", "stragglers", "train_flops_per_step", "w_to_dbm",
]

# Accelerator power P(f) = accel_power_w * (f/f_max)^2; energy = P * cycles / f ~ f^1.
ACCEL_POWER_EXPONENT = 2.0


@dataclass
class ChannelConfig:
    """Radio parameters of the cell (all clients upload to one access point at its centre)."""

    bandwidth_hz: float = 20e6          # total uplink band, shared equally per round (FDMA)
    noise_dbm_per_hz: float = -174.0    # thermal noise density at 290 K
    downlink_rate_bps: float = 50e6     # broadcast rate of the global model
    rx_power_w: float = 0.1             # radio receive power while downloading
    cell_m: float = 500.0               # side of the square cell (see devices.make_population)

    @classmethod
    def from_config(cls, devices) -> ChannelConfig:
        """From the ``[devices]`` config section."""
        return cls(bandwidth_hz=devices.bandwidth_hz, noise_dbm_per_hz=devices.noise_dbm_per_hz,
                   downlink_rate_bps=devices.downlink_rate_bps, cell_m=devices.cell_m)


def w_to_dbm(w):
    """Watts to decibel-milliwatts (vectorised)."""
    return 10.0 * np.log10(np.asarray(w, dtype=float)) + 30.0


def path_loss_db(distance_m):
    """Macro-cell path loss 128.1 + 37.6 log10(d_km) in dB (vectorised)."""
    return 128.1 + 37.6 * np.log10(np.asarray(distance_m, dtype=float) / 1000.0)


def channel_gain(distance_m, shadowing_db, rng: np.random.Generator) -> np.ndarray:
    """Linear power gain h = 10^(-(PL + shadowing)/10) * Exp(1) Rayleigh fading, one draw each."""
    loss_db = path_loss_db(distance_m) + np.asarray(shadowing_db, dtype=float)
    fading = rng.exponential(1.0, size=np.shape(loss_db))
    return 10.0 ** (-loss_db / 10.0) * fading


def rate_bps(bandwidth_hz, tx_power_w, gain, noise_dbm_per_hz: float = -174.0) -> np.ndarray:
    """Shannon rate B log2(1 + p h / (N0 B)) in bit/s (vectorised)."""
    b = np.asarray(bandwidth_hz, dtype=float)
    n0_w_per_hz = dbm_to_w(noise_dbm_per_hz)
    snr = np.asarray(tx_power_w, dtype=float) * np.asarray(gain, dtype=float) / (n0_w_per_hz * b)
    return b * np.log1p(snr) / np.log(2.0)  # log1p: exact at the tiny SNRs of far clients


def share_bandwidth(num_uploading: int, cfg: ChannelConfig) -> np.ndarray:
    """Equal FDMA split of the uplink band among this round's uploading clients."""
    return np.full(num_uploading, cfg.bandwidth_hz / max(num_uploading, 1))


def draw_round_channel(
    profiles: pd.DataFrame, rng: np.random.Generator, cfg: ChannelConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Per-round (gain, bandwidth_hz) for the selected clients' rows of profiles."""
    gain = channel_gain(profiles["distance_m"].to_numpy(), profiles["shadowing_db"].to_numpy(), rng)
    return gain, share_bandwidth(len(profiles), cfg)


def compute_energy_model(profiles: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(coeff, exponent) per client with compute_energy_j = coeff * cycles * f**exponent."""
    accel_w = profiles["accel_power_w"].to_numpy(dtype=float)
    f_max = profiles["cpu_hz_max"].to_numpy(dtype=float)
    is_accel = accel_w > 0
    coeff = np.where(is_accel, accel_w / f_max**ACCEL_POWER_EXPONENT,
                     profiles["kappa"].to_numpy(dtype=float))
    exponent = np.where(is_accel, ACCEL_POWER_EXPONENT - 1.0, 2.0)
    return coeff, exponent


def _cycles(profiles: pd.DataFrame, local_flops) -> np.ndarray:
    return np.asarray(local_flops, dtype=float) / profiles["flops_per_cycle"].to_numpy(dtype=float)


def compute_s(profiles: pd.DataFrame, local_flops, cpu_hz) -> np.ndarray:
    """Local training time: FLOPs / (flops_per_cycle * f)."""
    return _cycles(profiles, local_flops) / np.asarray(cpu_hz, dtype=float)


def compute_energy_j(profiles: pd.DataFrame, local_flops, cpu_hz) -> np.ndarray:
    """Local training energy (kappa c f^2 for CPUs, P(f) * time for accelerators)."""
    coeff, exponent = compute_energy_model(profiles)
    return coeff * _cycles(profiles, local_flops) * np.asarray(cpu_hz, dtype=float) ** exponent


def round_costs(
    profiles: pd.DataFrame,
    local_flops: np.ndarray,
    upload_bytes: np.ndarray,
    download_bytes,
    tx_power_w: np.ndarray,
    cpu_hz: np.ndarray,
    gain: np.ndarray,
    bandwidth_hz: np.ndarray,
    cfg: ChannelConfig,
) -> dict[str, np.ndarray]:
    """Per-client time (s) and energy (J) of one round: download, then compute, then upload."""
    n = len(profiles)
    rate = rate_bps(bandwidth_hz, tx_power_w, gain, cfg.noise_dbm_per_hz)
    upload_s = np.asarray(upload_bytes, dtype=float) * 8.0 / rate
    download_s = np.broadcast_to(
        np.asarray(download_bytes, dtype=float) * 8.0 / cfg.downlink_rate_bps, (n,)
    ).copy()
    comp_s = compute_s(profiles, local_flops, cpu_hz)
    costs = {
        "compute_s": comp_s,
        "upload_s": upload_s,
        "download_s": download_s,
        "compute_energy_j": compute_energy_j(profiles, local_flops, cpu_hz),
        "upload_energy_j": np.asarray(tx_power_w, dtype=float) * upload_s,
        "download_energy_j": cfg.rx_power_w * download_s,
        "rate_bps": rate,
        "total_s": download_s + comp_s + upload_s,
    }
    costs["energy_j"] = (
        costs["compute_energy_j"] + costs["upload_energy_j"] + costs["download_energy_j"]
    )
    return costs


def stragglers(total_s, deadline_s: float) -> np.ndarray:
    """True where a client's round time exceeds the deadline."""
    return np.asarray(total_s, dtype=float) > deadline_s


def forward_flops(module, example_inputs: tuple, only=None) -> int:
    """FLOPs of one forward pass, counting nn.Conv2d / nn.Linear MACs (x2) with forward hooks
    (only in the layers whose name ``only(name)`` accepts, when given).

    Conv2d: 2 * out.numel() * (C_in / groups) * k_h * k_w; Linear: 2 * out.numel() * in_features.
    Bias adds, norms, activations and attention score products are ignored (small next to the
    convolutions of a UNet). Runs under no_grad in eval mode, then restores the module's mode.
    """
    import torch
    from torch import nn

    total = 0

    def conv_hook(layer: nn.Conv2d, _inputs, output) -> None:
        nonlocal total
        k_h, k_w = layer.kernel_size
        total += 2 * output.numel() * (layer.in_channels // layer.groups) * k_h * k_w

    def linear_hook(layer: nn.Linear, _inputs, output) -> None:
        nonlocal total
        total += 2 * output.numel() * layer.in_features

    handles = []
    for name, layer in module.named_modules():
        if only is not None and not only(name):
            continue
        if isinstance(layer, nn.Conv2d):
            handles.append(layer.register_forward_hook(conv_hook))
        elif isinstance(layer, nn.Linear):
            handles.append(layer.register_forward_hook(linear_hook))
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(*example_inputs)
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    return int(total)


def train_flops_per_step(module, example_inputs: tuple) -> int:
    """Training FLOPs of one optimiser step on example_inputs' batch: ~3x the forward pass
    (backward costs ~2x forward: gradients w.r.t. activations and weights)."""
    return 3 * forward_flops(module, example_inputs)
