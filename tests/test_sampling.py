"""The default sampler on a tiny trained model: no salt-and-pepper static.

The model (the tiny preset, 300 central steps on the built-in digits, 1,000 timesteps as in
the main job) is trained once per test session. The sampler as the project built it before
the fix (DPM-Solver++ from the training config: no x0 clipping, its own grid) turns a good
share of this same model's samples into static, so the check can fail.
"""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from ssdiff_ray.config import DataConfig, EvalConfig
from ssdiff_ray.data import load_dataset
from ssdiff_ray.metrics.speckle import speckled
from ssdiff_ray.model.sampling import sample
from ssdiff_ray.model.unet import build_scheduler, build_unet, get_flat
from ssdiff_ray.train import LocalTrainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def tiny_digit_model():
    torch.manual_seed(0)
    unet, scheduler = build_unet("tiny", 16, 1, seed=0), build_scheduler(1000)
    images = load_dataset(DataConfig()).images
    LocalTrainer(unet, scheduler.alphas_cumprod, lr=3e-3).train(
        get_flat(unet), images, steps=300, batch_size=32, seed=0)
    return unet.eval(), scheduler


@torch.no_grad()
def _dpm_as_built_before_the_fix(unet, scheduler, n, steps, seed):
    x = torch.randn((n, 1, 16, 16), generator=torch.Generator().manual_seed(seed))
    sched = DPMSolverMultistepScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x.clamp(-1, 1).numpy()


def test_default_sampler_gives_no_speckled_images(tiny_digit_model):
    unet, scheduler = tiny_digit_model
    e = EvalConfig()
    images = sample(unet, scheduler, 64, sampler=e.sampler, steps=e.steps, seed=1)
    assert np.isfinite(images).all()
    assert speckled(images).sum() == 0


def test_the_old_dpm_construction_speckles_on_the_same_model(tiny_digit_model):
    unet, scheduler = tiny_digit_model
    images = _dpm_as_built_before_the_fix(unet, scheduler, 64, 10, seed=1)
    assert speckled(images).mean() >= 0.1


def test_speckle_check_tells_static_from_digits():
    digits = load_dataset(DataConfig()).images[:200]
    static = np.random.default_rng(0).uniform(-1, 1, (20, 1, 16, 16)).astype(np.float32)
    assert speckled(digits).mean() <= 0.01
    assert speckled(static).all()
