"""Every registered choice is constructible through the config, and the registries the
driver reads stay torch-free. (Aggregators, attacks and estimators have their own
every-choice tests beside their behaviour tests.)"""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_policies import _ctx

from ssdiff_ray import codec, config
from ssdiff_ray.attacks import ATTACKS
from ssdiff_ray.data import SOURCES, load_dataset
from ssdiff_ray.devices import DEVICE_CLASSES, make_population
from ssdiff_ray.model import PRESETS, SAMPLERS
from ssdiff_ray.policies import POLICIES, make_policy
from tuning.choices import PRUNER_CHOICES, PRUNERS
from tuning.choices import SAMPLERS as TUNE_SAMPLERS


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_chooses_codec_widths_for_every_client(name):
    cfg = config.load(None, [f"quant.policy={name}", "quant.bits=4"])
    policy = make_policy(cfg)
    assert policy.name == name
    d = policy.choose(_ctx(n=12, losses=(1.0, 0.8)))
    assert len(d.bits) == 12 and set(d.bits.tolist()) <= set(codec.SUPPORTED_BITS)


def _write_small_set(tmp_path, name: str):
    """Six 8 x 8 images with two labels, as the source reads them."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [(rng.random((8, 8)) * 255).astype(np.uint8) for _ in range(6)]
    if name == "parquet":
        path = tmp_path / "set.parquet"
        pq.write_table(pa.table({"image": [im.astype(np.float32).tolist() for im in images],
                                 "label": [0, 1] * 3}), path)
        return path
    if name == "image_folder":
        for i, im in enumerate(images):
            folder = tmp_path / "root" / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(folder / f"{i}.png")
        return tmp_path / "root"
    raise AssertionError(f"no small set for source {name!r}: add one here")


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_data_source_loads_images_in_range(name, tmp_path):
    overrides = [f"data.name={name}", "data.image_size=8"]
    if SOURCES[name][1]:  # a source that reads a file: write a small one of its kind
        overrides.append(f"data.path={_write_small_set(tmp_path, name)}")
    data = load_dataset(config.load(None, overrides).data)
    assert data.images.ndim == 4 and data.images.shape[-2:] == (8, 8)
    assert data.images.min() >= -1 and data.images.max() <= 1 and len(data.labels) == len(data.images)


@pytest.mark.parametrize("name", list(DEVICE_CLASSES))
def test_every_device_class_makes_a_population(name):
    cfg = config.load(None, [f"devices.class_mix={{ {name} = 1.0 }}"])
    pop = make_population(5, 0, cfg.devices.class_mix)
    assert (pop["device_class"] == name).all() and (pop["cpu_hz_max"] > 0).all()


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_preset_builds_and_every_sampler_samples(preset, sampler):
    from ssdiff_ray.model.sampling import sample
    from ssdiff_ray.model.unet import build_scheduler, build_unet

    cfg = config.load(None, [f"model.preset={preset}", f"eval.sampler={sampler}"])
    unet = build_unet(cfg.model.preset, 8)
    images = sample(unet, build_scheduler(20), 2, sampler=cfg.eval.sampler, steps=2)
    assert images.shape == (2, 1, 8, 8) and np.isfinite(images).all()


def test_trigger_names_are_unique_across_attack_families():
    names = [t for _, triggers in ATTACKS.values() for t in triggers]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", list(TUNE_SAMPLERS))
def test_every_tuner_sampler_builds_and_is_a_tune_choice(name):
    import optuna

    from ssdiff_ray.cli import build_parser

    assert isinstance(TUNE_SAMPLERS[name](4, 0), optuna.samplers.BaseSampler)
    assert build_parser().parse_args(["tune", "--sampler", name]).sampler == name


@pytest.mark.parametrize("name", PRUNER_CHOICES)
def test_every_tuner_pruner_builds_and_is_a_tune_choice(name):
    import optuna

    from ssdiff_ray.cli import build_parser

    if name in PRUNERS:  # "auto" is resolved to one of them by the study
        assert isinstance(PRUNERS[name](3, 1), optuna.pruners.BasePruner)
    assert build_parser().parse_args(["tune", "--pruner", name]).pruner == name


def test_config_and_registries_import_without_torch():
    """The driver reads every choice list and builds the round loop without torch."""
    code = ("import sys; import ssdiff_ray.config, ssdiff_ray.api, ssdiff_ray.cli, "
            "ssdiff_ray.driver.federation, ssdiff_ray.planner, ssdiff_ray.ledger, ssdiff_ray.run_dir; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_command_line_reads_the_choice_lists_without_ray_or_optuna():
    """``ssdiff --help`` reads every choice list (the tuner's too) without loading Ray or Optuna."""
    code = ("import sys; from ssdiff_ray import cli; cli.build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'optuna', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_ddpm_cifar10_preset_is_the_published_architecture():
    """The diffusers config of google/ddpm-cifar10-32 (128-256-256-256 channels, attention at
    16 x 16, two ResNet layers per block) has about 35.7 M parameters at 32 x 32 x 3; the
    count is pinned so the preset cannot drift from that architecture unnoticed."""
    from ssdiff_ray.model.unet import build_unet

    unet = build_unet("ddpm_cifar10", 32, 3)
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307
    assert unet.config.down_block_types[1] == "AttnDownBlock2D"
