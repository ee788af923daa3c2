"""The clients' learning-rate schedule over rounds, on the sequential and batched trainers."""

import numpy as np
import pytest
import torch

from ssdiff_ray.batched import BatchedTrainer
from ssdiff_ray.model.sampling import sample
from ssdiff_ray.model.unet import build_scheduler, build_unet, get_flat
from ssdiff_ray.train import LocalTrainer, round_lr


def test_round_lr_cosine_ends_at_lr_final():
    lrs = [round_lr(3e-3, 2e-4, "cosine", r, 24) for r in range(1, 25)]
    assert lrs[0] == pytest.approx(3e-3) and lrs[-1] == pytest.approx(2e-4)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # strictly decreasing
    assert lrs[11] == pytest.approx(2e-4 + 2.8e-3 * 0.5 * (1 + np.cos(np.pi * 11 / 23)))
    assert round_lr(3e-3, 2e-4, "constant", 24, 24) == 3e-3
    assert round_lr(3e-3, 2e-4, "cosine", 1, 1) == 3e-3  # a one-round run trains at lr


def _one_client_delta(batched, lr_ctor, lr_round=None, steps=1, warmup=0):
    """One client's update from a tiny UNet, sequential or batched (vmap)."""
    torch.set_num_threads(1)
    unet = build_unet("tiny", 16, seed=3)
    ac = build_scheduler(100).alphas_cumprod
    start = get_flat(unet)
    x = np.random.default_rng(0).uniform(-1, 1, (16, 1, 16, 16)).astype(np.float32)
    if batched:
        return BatchedTrainer(unet, ac, lr_ctor, 1.0, warmup_steps=warmup).train(
            start, [x], steps, 8, [5], None, lr_round)[0][0]
    return LocalTrainer(unet, ac, lr_ctor, 1.0, warmup_steps=warmup).train(
        start, x, steps, 8, 5, None, lr_round)[0]


@pytest.mark.parametrize("batched", [False, True])
def test_trainer_uses_the_round_lr(batched):
    # One Adam step moves each weight by about lr: the round's lr, not the constructor's.
    small, big = _one_client_delta(batched, 1e-3, 1e-4), _one_client_delta(batched, 1e-4, 1e-3)
    assert np.abs(big).max() == pytest.approx(1e-3, rel=0.05)
    assert np.abs(small).max() == pytest.approx(1e-4, rel=0.05)
    np.testing.assert_allclose(_one_client_delta(batched, 1e-3), big, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("batched", [False, True])
def test_local_warmup_makes_the_fresh_adams_first_steps_small(batched):
    # a fresh Adam's first step moves every weight by about lr whatever the gradient; with a
    # warm-up of 4 steps the first moves lr / 4, and a run of 8 steps moves less in all
    def delta(steps, warmup):
        return _one_client_delta(batched, 1e-3, steps=steps, warmup=warmup)

    assert np.abs(delta(1, 4)).max() == pytest.approx(2.5e-4, rel=0.05)
    assert np.abs(delta(1, 0)).max() == pytest.approx(1e-3, rel=0.05)
    assert np.linalg.norm(delta(8, 4)) < 0.8 * np.linalg.norm(delta(8, 0))


@pytest.mark.parametrize("sampler", ["dpm", "ddim"])
def test_sampling_in_batches_equals_one_batch(sampler):
    # DPM-Solver++ is a multistep solver with per-run state: each batch needs its own
    # (a shared one ran past its timesteps and raised IndexError on the second batch)
    unet = build_unet("tiny", 8, seed=0)
    sched = build_scheduler(50, "linear")
    x_T = torch.randn((7, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    whole = sample(unet, sched, 7, sampler=sampler, steps=4, x_T=x_T, batch_size=7)
    batched = sample(unet, sched, 7, sampler=sampler, steps=4, x_T=x_T, batch_size=3)
    np.testing.assert_allclose(batched, whole, atol=1e-5)
