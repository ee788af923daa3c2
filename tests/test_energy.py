"""Channel and cost formulas against hand-computed values; FLOP counting against a hand count."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ssdiff_ray import energy
from ssdiff_ray.devices import make_population


def test_path_loss_and_db_conversions():
    assert energy.path_loss_db(100.0) == pytest.approx(90.5)        # 128.1 + 37.6 * log10(0.1)
    assert energy.path_loss_db(1000.0) == pytest.approx(128.1)
    np.testing.assert_allclose(energy.path_loss_db([10.0, 500.0]),
                               [128.1 - 75.2, 128.1 + 37.6 * np.log10(0.5)])
    assert energy.dbm_to_w(30.0) == pytest.approx(1.0)
    assert energy.dbm_to_w(23.0) == pytest.approx(0.19953, rel=1e-4)
    assert energy.w_to_dbm(0.001) == pytest.approx(0.0)
    np.testing.assert_allclose(energy.w_to_dbm(energy.dbm_to_w([-174.0, 10.0])), [-174.0, 10.0])


def test_channel_gain_is_path_loss_shadowing_and_rayleigh_fading():
    d = np.array([100.0, 250.0, 400.0])
    shadow = np.array([0.0, 8.0, -4.0])
    gain = energy.channel_gain(d, shadow, np.random.default_rng(5))
    fading = np.random.default_rng(5).exponential(1.0, 3)
    np.testing.assert_allclose(gain, 10 ** (-(energy.path_loss_db(d) + shadow) / 10) * fading)
    many = energy.channel_gain(np.full(200_000, 100.0), 0.0, np.random.default_rng(0))
    assert many.mean() == pytest.approx(10 ** -9.05, rel=0.01)          # E|h|^2 = 1


def test_rate_hand_computed():
    # N0 = -150 dBm/Hz = 1e-18 W/Hz; SNR = 1 W * 3e-12 / (1e-18 * 1e6) = 3 -> log2(4) = 2
    assert energy.rate_bps(1e6, 1.0, 3e-12, -150.0) == pytest.approx(2e6)
    # default -174 dBm/Hz: B = 1 MHz, p = 0.1 W, h = 1e-10 -> SNR = 1e-11 / 3.981e-15
    snr = 1e-11 / (10 ** (-20.4) * 1e6)
    assert energy.rate_bps(1e6, 0.1, 1e-10) == pytest.approx(1e6 * np.log2(1 + snr))
    np.testing.assert_allclose(energy.rate_bps([1e6, 2e6], [1.0, 1.0], [3e-12, 6e-12], -150.0),
                               [2e6, 4e6])


def _profiles(kappa, accel_w, f_max, flops_per_cycle=2.0) -> pd.DataFrame:
    return pd.DataFrame({"kappa": kappa, "accel_power_w": accel_w, "cpu_hz_max": f_max,
                         "flops_per_cycle": flops_per_cycle})


def test_round_costs_worked_example():
    # client 0: CPU, kappa 1e-28; client 1: accelerator, 10 W at 1 GHz, run at 0.5 GHz
    prof = _profiles([1e-28, 0.0], [0.0, 10.0], [2e9, 1e9])
    cfg = energy.ChannelConfig(noise_dbm_per_hz=-150.0, downlink_rate_bps=50e6, rx_power_w=0.1)
    costs = energy.round_costs(
        prof, local_flops=np.array([2e9, 2e9]), upload_bytes=np.array([1e6, 5e5]),
        download_bytes=50_000_000, tx_power_w=np.array([1.0, 1.0]),
        cpu_hz=np.array([1e9, 0.5e9]), gain=np.array([3e-12, 3e-12]),
        bandwidth_hz=np.array([1e6, 1e6]), cfg=cfg,
    )
    # 1e9 cycles at 1 GHz: 1 s, kappa c f^2 = 1e-28 * 1e9 * 1e18 = 0.1 J
    # 1e9 cycles at 0.5 GHz: 2 s at 10 W * 0.5^2 = 2.5 W -> 5 J
    np.testing.assert_allclose(costs["compute_s"], [1.0, 2.0])
    np.testing.assert_allclose(costs["compute_energy_j"], [0.1, 5.0])
    # 8e6 bits at 2 Mbit/s = 4 s at 1 W; 4e6 bits: 2 s
    np.testing.assert_allclose(costs["rate_bps"], [2e6, 2e6])
    np.testing.assert_allclose(costs["upload_s"], [4.0, 2.0])
    np.testing.assert_allclose(costs["upload_energy_j"], [4.0, 2.0])
    # 4e8 bits at 50 Mbit/s = 8 s at 0.1 W
    np.testing.assert_allclose(costs["download_s"], [8.0, 8.0])
    np.testing.assert_allclose(costs["download_energy_j"], [0.8, 0.8])
    np.testing.assert_allclose(costs["total_s"], [13.0, 12.0])
    np.testing.assert_allclose(costs["energy_j"], [4.9, 7.8])
    assert energy.stragglers(costs["total_s"], 12.5).tolist() == [True, False]
    assert not energy.stragglers(costs["total_s"], np.inf).any()


def test_draw_round_channel_shares_bandwidth():
    pop = make_population(8, seed=0)
    gain, bw = energy.draw_round_channel(pop.iloc[[1, 3, 5, 7]], np.random.default_rng(0),
                                         energy.ChannelConfig(bandwidth_hz=20e6))
    assert gain.shape == (4,) and (gain > 0).all()
    np.testing.assert_allclose(bw, 5e6)


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.c2(torch.relu(self.c1(x)))), 1))


def test_forward_flops_hand_count():
    net = _TinyNet().train()
    x = torch.zeros(2, 1, 8, 8)
    # c1: out 4x8x8 = 256, 1*3*3 MACs each -> 2304; c2: out 8x4x4 = 128, (4/2)*3*3 = 18 -> 2304;
    # fc: 10 outputs x 128 -> 1280. FLOPs = 2 * MACs, batch of 2.
    expected = 2 * 2 * (2304 + 2304 + 1280)
    assert energy.forward_flops(net, (x,)) == expected
    assert energy.train_flops_per_step(net, (x,)) == 3 * expected
    assert net.training                      # mode restored
    assert not net.c1._forward_hooks         # hooks removed


def test_forward_flops_on_diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
    )
    one = energy.forward_flops(unet, (torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)))
    two = energy.forward_flops(unet, (torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)))
    assert one > 0 and two == 2 * one
