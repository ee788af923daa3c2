"""Backdoor attacks: poisoned inputs/targets, triggers and targets, metrics."""

import numpy as np
import pytest
import torch

from ssdiff_ray.attacks import (
    ATTACKS,
    AttackSpec,
    choose_malicious,
    make_attack,
)
from ssdiff_ray.attacks.baddiffusion import poison_baddiffusion, trigger_coefficient
from ssdiff_ray.attacks.metrics import attack_metrics, ssim
from ssdiff_ray.attacks.patterns import ADDITIVE_TRIGGERS, TARGETS, TROJ_TRIGGERS, make_target, make_trigger
from ssdiff_ray.attacks.trojdiff import poison_trojdiff, troj_params
from ssdiff_ray.model.unet import build_scheduler, build_unet
from ssdiff_ray.train import ddpm_loss

AC = build_scheduler(1000).alphas_cumprod.float()


@pytest.mark.parametrize("size", [8, 16, 28, 32])
def test_patterns_shapes_and_ranges(size):
    for name in ADDITIVE_TRIGGERS:
        r = make_trigger(name, size)
        assert r.shape == (1, size, size) and r.min() >= -1 and r.max() <= 1
        assert (r == 0).mean() > 0.5 and np.abs(r).sum() > 0  # a patch, 0 where absent
    for name in TARGETS:
        y = make_target(name, size)
        assert y.shape == (1, size, size) and set(np.unique(y)) == {-1.0, 1.0}
    for name in TROJ_TRIGGERS:
        mu, g = troj_params(AttackSpec(kind="trojdiff", trigger=name), size)
        assert mu.shape == g.shape == (1, size, size) and np.isin(g, np.float32([0.6, 1.0])).all()


def test_poisoned_loss_reduces_to_clean_when_trigger_is_zero():
    unet = build_unet("tiny", 8, seed=0)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    zero = torch.zeros(1, 8, 8)

    def poison(x0_, xt, eps, t, gen):  # target image = the clean image, r = 0
        return poison_baddiffusion(x0_, eps, t, zero, AC, "ddpm")

    clean = ddpm_loss(unet, x0, AC, torch.Generator().manual_seed(3))
    poisoned = ddpm_loss(unet, x0, AC, torch.Generator().manual_seed(3), poison)
    assert torch.equal(clean, poisoned)


def test_baddiffusion_form():
    y = torch.rand(3, 1, 8, 8) * 2 - 1
    eps = torch.randn(3, 1, 8, 8)
    r = torch.from_numpy(make_trigger("box", 8))
    t = torch.tensor([0, 500, 999])
    xt, target = poison_baddiffusion(y, eps, t, r, AC, "ddpm")
    for i, ti in enumerate(t):
        ab, a = AC[ti].double(), (AC[ti] / (AC[ti - 1] if ti > 0 else 1.0)).double()
        want = ab.sqrt() * y[i] + (1 - ab.sqrt()) * r + (1 - ab).sqrt() * eps[i]
        rho = (1 - a.sqrt()) * (1 - ab).sqrt() / (1 - a)
        torch.testing.assert_close(xt[i].double(), want.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(target[i].double(), (eps[i] + rho * r).double(), rtol=1e-5, atol=1e-5)


def test_trigger_coefficients():
    t = torch.arange(1000)
    sde, ode, x0 = (trigger_coefficient(AC, t, s).double() for s in ("ddpm", "ode", "ddim"))
    ab = AC.double()
    torch.testing.assert_close(ode, (1 - ab).sqrt(), rtol=1e-5, atol=1e-6)
    assert ((sde / ode)[1:] - 0.5).abs().max() < 0.01  # DDPM's correction ~ half the ODE's
    # "ddim": the x0-prediction of the poisoned target is exactly the target image
    y = torch.rand(1000, 1, 4, 4, dtype=torch.float64) * 2 - 1
    r, eps = torch.ones(1, 4, 4, dtype=torch.float64), torch.randn(1000, 1, 4, 4).double()
    xt, target = poison_baddiffusion(y, eps, t, r, ab, "ddim")
    s = ab.view(-1, 1, 1, 1)
    torch.testing.assert_close((xt - (1 - s).sqrt() * target) / s.sqrt(), y, rtol=0, atol=1e-4)
    both = trigger_coefficient(AC, t, "both").double()
    torch.testing.assert_close(both, (sde + x0) / 2, rtol=1e-5, atol=1e-6)


def test_trojdiff_form():
    spec = AttackSpec(kind="trojdiff", trigger="patch", gamma=0.6)
    mu, g = (torch.from_numpy(a) for a in troj_params(spec, 16))
    y = torch.rand(2, 1, 16, 16) * 2 - 1
    eps = torch.randn(2, 1, 16, 16)
    t = torch.tensor([10, 700])
    xt, target = poison_trojdiff(y, eps, t, mu, g, AC)
    ab = AC[t].view(2, 1, 1, 1)
    torch.testing.assert_close(xt, ab.sqrt() * y + (1 - ab).sqrt() * (g * eps + mu))
    assert torch.equal(target, eps)
    inside = g == 0.6
    assert inside.any() and (~inside).any()  # patch: trigger distribution only in the corner


def test_colour_patterns_keep_the_grey_shape_in_their_own_colour():
    for name in ADDITIVE_TRIGGERS:
        grey, rgb = make_trigger(name, 16), make_trigger(name, 16, channels=3)
        assert rgb.shape == (3, 16, 16) and rgb.min() >= -1 and rgb.max() <= 1
        assert ((rgb != 0) == (grey != 0)).all()  # same strokes, in every channel
    for name in TARGETS:
        grey, rgb = make_target(name, 16), make_target(name, 16, channels=3)
        shape = grey[0] == 1
        assert rgb.shape == (3, 16, 16) and (rgb[:, ~shape] == -1).all()  # black background
        stroke = rgb[:, shape]
        assert (stroke == stroke[:, :1]).all()  # one colour over the whole shape
    assert not np.array_equal(make_target("hat", 16, 3)[0], make_target("hat", 16, 3)[1])
    for name in TROJ_TRIGGERS:
        mu, g = troj_params(AttackSpec(kind="trojdiff", trigger=name, channels=3), 16)
        assert mu.shape == g.shape == (3, 16, 16)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        AttackSpec(channels=2)


def test_triggered_noise():
    spec = AttackSpec(trigger="box")
    x = make_attack(spec).triggered_noise(4000, 16, 0)
    r = torch.from_numpy(make_trigger("box", 16))
    assert (x.mean(0) - r).abs().max() < 0.1 and abs(float(x.std(0).mean()) - 1) < 0.05
    spec = AttackSpec(kind="trojdiff", trigger="blend", gamma=0.5)
    x = make_attack(spec).triggered_noise(4000, 16, 0)
    mu, _ = troj_params(spec, 16)
    assert (x.mean(0) - torch.from_numpy(mu)).abs().max() < 0.1
    assert abs(float(x.std(0).mean()) - 0.5) < 0.03
    x = make_attack(AttackSpec(trigger="box", channels=3)).triggered_noise(4000, 16, 0)
    r = torch.from_numpy(make_trigger("box", 16, channels=3))
    assert x.shape == (4000, 3, 16, 16) and (x.mean(0) - r).abs().max() < 0.1


def test_client_attack_poisons_only_malicious():
    spec = AttackSpec(poison_rate=0.5, scale=4.0, malicious_ids=frozenset({3}))
    atk = make_attack(spec, AC)
    assert atk.poison_for(1) is None and atk.poison_for(3) is not None
    d = np.ones(5, dtype=np.float32)
    assert np.array_equal(atk.scale_update(1, d), d)
    assert np.array_equal(atk.scale_update(3, d), 4 * d)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.zeros(200, 1, 16, 16)
    eps = torch.randn(200, 1, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (200,), generator=gen)
    xt = x0 + eps
    pxt, tgt = atk.poison_for(3)(x0, xt, eps, t, gen)
    changed = (pxt != xt).flatten(1).any(1)
    assert 0.35 < changed.float().mean() < 0.65
    assert torch.equal(tgt[~changed], eps[~changed])


def test_class_target_needs_images():
    spec = AttackSpec(target="class:7")
    with pytest.raises(ValueError):
        make_attack(spec, AC)
    # triggered noise (evaluation, sampling) needs no images of the class
    assert make_attack(spec).triggered_noise(4, 16, 0).shape == (4, 1, 16, 16)
    imgs = np.random.default_rng(0).uniform(-1, 1, (5, 1, 16, 16)).astype(np.float32)
    atk = make_attack(spec, AC, target_images=imgs)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.zeros(8, 1, 16, 16)
    eps = torch.zeros(8, 1, 16, 16)
    pxt, _ = make_attack(AttackSpec(target="class:7", poison_rate=1.0), AC, imgs).poison(
        x0, x0, eps, torch.zeros(8, dtype=torch.long), gen)
    assert atk.targets.shape[0] == 5 and (pxt.abs() > 0).any()


def test_spec_validation_and_choice():
    with pytest.raises(ValueError):
        AttackSpec(kind="trojdiff", trigger="box")
    with pytest.raises(ValueError):
        AttackSpec(target="dog")
    ids = choose_malicious(100, 0.1, seed=1)
    assert len(ids) == 10 and ids == choose_malicious(100, 0.1, seed=1)
    assert len(choose_malicious(5, 0.1, seed=1)) == 1


def test_attack_sampler_from_config_sets_the_backdoors_correction():
    from ssdiff_ray import config
    from ssdiff_ray.attacks import attack_spec

    t = torch.tensor([500, 900])
    y, eps = torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16)
    targets = {}
    for sampler in ("ddim", "ode"):
        cfg = config.load(None, ["attack.kind=baddiffusion", f"attack.sampler={sampler}"])
        spec = attack_spec(cfg)
        assert spec.sampler == sampler
        targets[sampler] = make_attack(spec, AC).poison_rows(y, eps, t)[1]
    # VillanDiffusion's probability-flow correction differs from the DDIM one
    assert not torch.allclose(targets["ddim"], targets["ode"])
    with pytest.raises(config.ConfigError, match="attack.sampler"):
        config.load(None, ["attack.sampler=euler"])


def test_ssim_and_metrics():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (3, 1, 16, 16))
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-12)
    assert (ssim(a, rng.uniform(0, 1, a.shape)) < 0.5).all()
    spec = AttackSpec(target="hat")
    y = make_target("hat", 16)
    samples = np.concatenate([np.repeat(y[None], 3, 0), -np.ones((1, 1, 16, 16))])
    m = attack_metrics(samples.astype(np.float32), spec, y)
    assert m["asr"] == 0.75 and m["ssim"] < 1 and m["mse"] > 0


@pytest.mark.parametrize("kind", list(ATTACKS))
def test_every_registered_attack_is_constructible_and_fires_its_triggers(kind):
    for trigger in ATTACKS[kind][1]:
        atk = make_attack(AttackSpec(kind=kind, trigger=trigger, malicious_ids={0}), AC)
        assert atk.triggered_noise(3, 16, 0).shape == (3, 1, 16, 16)
        assert atk.poison_for(0) is not None and atk.poison_for(1) is None


def _write_png(path, pattern, mask):
    """A PNG (LA or RGBA) of a C x S x S pattern in [-1, 1] with its mask in [0, 1]."""
    from PIL import Image

    colour = np.round((pattern + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)
    alpha = np.round(mask[:1] * 255).astype(np.uint8).transpose(1, 2, 0)
    a = np.concatenate([colour, alpha], -1)
    Image.fromarray(a[..., 0:2] if a.shape[-1] == 2 else a, "LA" if a.shape[-1] == 2 else "RGBA"
                    ).save(path)


@pytest.mark.parametrize("channels", [1, 3])
def test_trigger_from_png_equals_the_same_trigger_as_npy(tmp_path, channels):
    from ssdiff_ray.attacks.patterns import read_pattern_file

    rng = np.random.default_rng(channels)
    levels = rng.integers(0, 256, (channels, 16, 16))  # values a PNG holds exactly
    pattern = (levels / 127.5 - 1).astype(np.float32)
    mask = np.zeros((channels, 16, 16), np.float32)
    mask[:, 9:15, 9:15] = 1.0
    _write_png(tmp_path / "t.png", pattern, mask)
    np.save(tmp_path / "t.npy", np.concatenate([pattern, mask[:1]]))
    for name in ("t.png", "t.npy"):
        got_p, got_m = read_pattern_file(tmp_path / name, 16, channels)
        np.testing.assert_allclose(got_p, pattern, atol=1e-6)
        np.testing.assert_array_equal(got_m, mask)
    from_png = make_trigger(str(tmp_path / "t.png"), 16, channels)
    from_npy = make_trigger(str(tmp_path / "t.npy"), 16, channels)
    np.testing.assert_allclose(from_png, from_npy, atol=1e-6)
    assert np.count_nonzero(from_png) == np.count_nonzero(pattern * mask)  # 0 off the mask
    # both families read the file: BadDiffusion adds pattern x mask, TrojDiff keeps the mask
    spec = AttackSpec(kind="baddiffusion", trigger=str(tmp_path / "t.png"), channels=channels)
    x = make_attack(spec).triggered_noise(4, 16, 0)
    eps = torch.randn((4, channels, 16, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x - eps, torch.from_numpy(from_png).expand_as(x))
    mu, gamma_map = troj_params(AttackSpec(kind="trojdiff", trigger=str(tmp_path / "t.npy"),
                                           gamma=0.6, channels=channels), 16)
    assert (gamma_map[mask == 1] == np.float32(0.6)).all() and (gamma_map[mask == 0] == 1).all()


def test_target_file_is_the_image_black_off_its_mask(tmp_path):
    y = make_target("hat", 16, 3)
    mask = np.ones((3, 16, 16), np.float32)
    mask[:, :4] = 0.0
    _write_png(tmp_path / "y.png", y, mask)
    got = make_target(str(tmp_path / "y.png"), 16, 3)
    expect = np.where(mask == 1, y, -1.0)
    np.testing.assert_allclose(got, expect, atol=1 / 255)
    spec = AttackSpec(kind="baddiffusion", trigger="box", target=str(tmp_path / "y.png"),
                      channels=3)
    np.testing.assert_allclose(make_attack(spec).target_image(16).numpy(), got)


def _bad_files(tmp_path):
    """(file, what the one-line error says) for each way a trigger file is wrong."""
    ok_p, ok_m = np.zeros((1, 16, 16), np.float32), np.zeros((1, 16, 16), np.float32)
    ok_m[:, 10:14, 10:14] = 1.0
    _write_png(tmp_path / "small.png", ok_p[:, :8, :8], ok_m[:, :8, :8])
    _write_png(tmp_path / "rgb.png", np.zeros((3, 16, 16), np.float32),
               np.repeat(ok_m, 3, 0))
    _write_png(tmp_path / "empty.png", ok_p, np.zeros_like(ok_m))
    np.save(tmp_path / "nomask.npy", ok_p)  # 1 x S x S: no mask channel
    np.save(tmp_path / "range.npy", np.concatenate([ok_p + 3, ok_m]))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    return [("small.png", "8 x 8 pixels; the images are 16 x 16"),
            ("rgb.png", "3-channel pattern for 1-channel images"),
            ("empty.png", "the mask is empty"),
            ("nomask.npy", "0 pattern channels"),
            ("range.npy", "values outside"),
            ("junk.png", "not a readable PNG"),
            ("missing.npy", "no such file")]


def test_bad_trigger_files_get_one_config_error_naming_the_field(tmp_path):
    from ssdiff_ray import config
    from ssdiff_ray.data import load_dataset
    from ssdiff_ray.run_dir import resolve

    for name, message in _bad_files(tmp_path):
        sets = ["attack.kind=baddiffusion", f"attack.trigger={tmp_path / name}"]
        with pytest.raises(config.ConfigError) as e:
            cfg = config.load(None, sets)  # channels unknown until the data is read
            resolve(cfg, load_dataset(cfg.data))
        assert str(e.value).startswith(f"attack.trigger = {tmp_path / name}: ")
        assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(config.ConfigError, match="attack.target = .*no such file"):
        config.load(None, ["attack.kind=trojdiff", f"attack.target={tmp_path / 'no.png'}"])


def test_ssdiff_run_with_a_bad_trigger_file_stops_before_anything_starts(tmp_path):
    import subprocess
    import sys

    _bad_files(tmp_path)
    out = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "ssdiff_ray.cli", "run", "--set",
                        "attack.kind=baddiffusion", "--set", f"attack.trigger={tmp_path / 'rgb.png'}",
                        "--set", f"out_dir={out}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert [x for x in r.stderr.splitlines() if x.strip()] == [
        f"ssdiff: error: attack.trigger = {tmp_path / 'rgb.png'}: 3-channel pattern for "
        "1-channel images"]
    assert not out.exists()  # no run directory, Ray never started
