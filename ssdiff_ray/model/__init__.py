"""The diffusers model: UNet presets and sampler names (this file), the UNet and its flat
parameter vector (``unet``), sampling (``sampling``), saving and loading (``pipeline``).

This file is torch-free so that the config can validate preset and sampler names on the
driver, which never imports torch.
"""


def _plain(n: int) -> dict:
    return {"down_block_types": ("DownBlock2D",) * n, "up_block_types": ("UpBlock2D",) * n}


# UNet2DModel sizes; any channel count and image size (a multiple of 2^(levels - 1)).
# Parameters at 16 x 16 x 1 / 32 x 32 x 3: tiny 0.1 M, small 1.06 M, base 6.1 M.
PRESETS: dict[str, dict] = {
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                 **_plain(2)),
    "small": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
                  **_plain(3)),
    "base": dict(block_out_channels=(64, 128, 128), layers_per_block=2, norm_num_groups=16,
                 **_plain(3)),
    # Self-attention at the lower resolutions too, not only in the mid block (which every
    # preset has): more layers for LoRA's attention targets. tiny_attn 0.18 M, small_attn
    # 1.16 M parameters at 16 x 16 x 1.
    "tiny_attn": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                      attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    "small_attn": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
                       attention_head_dim=16,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    # The DDPM CIFAR-10 architecture (diffusers' google/ddpm-cifar10-32 config), 35.7 M
    # parameters at 32 x 32 x 3: for GPU clusters.
    "ddpm_cifar10": dict(
        block_out_channels=(128, 256, 256, 256), layers_per_block=2, norm_num_groups=32,
        norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}

BETA_SCHEDULES = ("linear", "squaredcos_cap_v2", "scaled_linear")
SAMPLERS = ("dpm", "ddim", "ddpm")  # DPM-Solver++, DDIM (eta = 0), ancestral DDPM
