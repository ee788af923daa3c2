"""The diffusers model: UNet presets and sampler names (this file), the UNet and its flat
parameter vector (``unet``), sampling (``sampling``), saving and loading (``pipeline``).

This file is torch-free so that the config can validate preset and sampler names on the
driver, which never imports torch.
"""

# UNet2DModel sizes. "small" is ~1.06M parameters at 16x16 x 1 channel.
PRESETS: dict[str, dict] = {
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
    "small": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8),
    "base": dict(block_out_channels=(64, 128, 128), layers_per_block=2, norm_num_groups=16),
}

BETA_SCHEDULES = ("linear", "squaredcos_cap_v2", "scaled_linear")
SAMPLERS = ("dpm", "ddim", "ddpm")  # DPM-Solver++, DDIM (eta = 0), ancestral DDPM
