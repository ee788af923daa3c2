"""Batched (vmapped) clients train exactly like the sequential path, within float tolerance."""

import numpy as np
import pytest
import torch

from actors.client_pool import ClientPool
from ssdiff_ray import codec, config
from ssdiff_ray.batched import BatchedTrainer, use_batched
from ssdiff_ray.model.unet import build_scheduler, build_unet, get_flat
from ssdiff_ray.run_dir import prepare
from ssdiff_ray.train import LocalTrainer


def _close(a: np.ndarray, b: np.ndarray) -> None:
    # Adam divides by sqrt(v): where a gradient is ~0, float noise moves that weight by up
    # to lr either way, so compare the whole update (relative L2), not element by element.
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-3


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("grad_clip,warmup", [(1.0, 0), (0.0, 0), (1.0, 2)])
def test_batched_matches_sequential(grad_clip, warmup, device, monkeypatch):
    """The same deltas on the CPU and, where there is one, on a GPU (auto batches there)."""
    torch.set_num_threads(1)
    # cuDNN's default TF32 convolutions round differently in the two paths: 1 % of the
    # update's norm apart on an H200 (0.01 % with TF32 off), which hides nothing but noise
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    unet = build_unet("tiny", 16, seed=3).to(device)
    ac = build_scheduler(100).alphas_cumprod
    start = get_flat(unet)
    rng = np.random.default_rng(0)
    # one client smaller than the batch: the batched path pads and masks it
    images = [rng.uniform(-1, 1, (n, 1, 16, 16)).astype(np.float32) for n in (20, 5, 12, 9)]
    seeds = [11, 12, 13, 14]
    seq = LocalTrainer(unet, ac, 1e-3, grad_clip, warmup_steps=warmup)
    expect = [seq.train(start, x, 3, 8, s) for x, s in zip(images, seeds)]
    # max_clients=3 also covers training the clients in two chunks
    deltas, losses = BatchedTrainer(unet, ac, 1e-3, grad_clip, max_clients=3,
                                   warmup_steps=warmup).train(
        start, images, 3, 8, seeds)
    assert deltas.shape == (4, len(start))
    for i, (d, loss) in enumerate(expect):
        _close(deltas[i], d)
        assert losses[i] == pytest.approx(loss, rel=1e-5)
    assert not np.allclose(deltas[0], deltas[1])  # clients differ: per-client randomness


def test_use_batched_choice():
    same, mixed = np.array([2, 2, 2]), np.array([2, 3, 2])
    assert not use_batched("auto", "cpu", same)   # slower on CPU: keep sequential
    assert use_batched("auto", "cuda", same)
    assert not use_batched("auto", "cuda", mixed)  # unequal steps cannot share a step
    assert use_batched("on", "cpu", same)
    assert not use_batched("off", "cuda", same)


def test_client_group_batched_round(tmp_path, tiny_overrides):
    """A whole pool round (train + encode) gives the same payload sizes and losses."""
    out = {}
    for mode in ("off", "on"):
        cfg = config.load(None, [*tiny_overrides, f"ray.batched_clients={mode}",
                                 "quant.bits=32"])
        (tmp_path / mode).mkdir()
        prep = prepare(cfg, tmp_path / mode)
        group = ClientPool(cfg, prep.shard_dir)
        start = get_flat(group.trainer.unet)
        ids = np.array([0, 2, 4])
        out[mode] = group.train_round(start, 1, ids, np.full(3, 32), np.full(3, 2))
    (m_off, b_off), (m_on, b_on) = out["off"], out["on"]
    np.testing.assert_array_equal(m_off.uplink_bytes, m_on.uplink_bytes)
    np.testing.assert_allclose(m_on.loss, m_off.loss, rtol=1e-5)
    np.testing.assert_allclose(m_on.update_norm, m_off.update_norm, rtol=2e-3)
    for i in range(3):  # each payload sits at its offset in the blob and decodes to the update
        a, b = (codec.decode(blob[m.offsets[i]:m.offsets[i + 1]]) for m, blob in
                ((m_on, b_on), (m_off, b_off)))
        assert np.linalg.norm(b) == pytest.approx(m_off.update_norm[i], rel=1e-5)
        _close(a, b)
