"""A run directory and what a run needs before it starts, without Ray: the resolved config,
the client shards, the device population and each client's local work."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ssdiff_ray import config as config_mod
from ssdiff_ray.config import Config
from ssdiff_ray.data import Dataset, load_dataset
from ssdiff_ray.data.shards import shard_path, write_shards
from ssdiff_ray.data.split import dirichlet_split


def new_run_dir(cfg: Config) -> Path:
    name = cfg.name or time.strftime("run-%Y%m%d-%H%M%S")
    run_dir = Path(cfg.out_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        # Never overwrite a finished or resumable run: pick the next free suffix.
        k = 1
        while (Path(cfg.out_dir) / f"{name}-{k}").exists():
            k += 1
        run_dir = Path(cfg.out_dir) / f"{name}-{k}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


@dataclass
class Prepared:
    cfg: Config               # resolved: data.channels and data.num_classes from the data
    run_dir: Path
    shard_dir: Path
    num_samples: np.ndarray   # per client
    population: pd.DataFrame  # device profiles, one row per client
    local_steps: np.ndarray   # per client, from its device class


def prepare(cfg: Config, run_dir: str | Path | None = None) -> Prepared:
    """Load and check the data set and the device population, then write the resolved
    config (channels and classes read from the data), the client shards and the
    population into ``run_dir`` (a new one when None). A bad data or profile file stops
    before anything is created."""
    data = load_dataset(cfg.data)
    cfg = resolve(cfg, data)
    pop = population(cfg)
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_mod.save(cfg, run_dir / "config.toml")
    if data.class_names is not None:  # label k is class_names[k]
        (run_dir / "class_names.json").write_text(json.dumps(data.class_names))
    n = cfg.clients.count
    train_rows = np.arange(len(data.labels))
    if cfg.data.holdout > 0:
        train_rows, held = holdout_split(data.labels, cfg.data.holdout, cfg.seed)
        pd.DataFrame({"index": held, "label": data.labels[held]}).to_parquet(
            run_dir / "holdout.parquet", index=False)
    split = dirichlet_split(data.labels[train_rows], n, cfg.data.alpha, cfg.seed,
                            cfg.data.min_samples)
    split = [train_rows[s] for s in split]
    shard_dir = run_dir / "shards"
    if not shard_path(shard_dir, n - 1).exists():
        write_shards(data.images, data.labels, split, shard_dir)
    pop.to_parquet(run_dir / "devices.parquet")
    if cfg.train.scale_work_by_device:
        steps = np.maximum(1, np.round(cfg.train.local_steps * pop["work_scale"].to_numpy()))
    else:
        steps = np.full(n, cfg.train.local_steps)
    num_samples = np.array([len(s) for s in split], dtype=np.int64)
    return Prepared(cfg, run_dir, shard_dir, num_samples, pop, steps.astype(np.int64))


def holdout_split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): ``share`` of each class held out, seeded, both sorted."""
    rng = np.random.default_rng([seed, 7])  # its own stream: the client split stays as it was
    held = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        held.append(rows[:max(1, round(share * len(rows)))])
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held), held


def real_split(run_dir: str | Path, cfg: Config) -> tuple[Dataset, Dataset]:
    """(the data the run's clients held, its held-out data) as arrays; a run without
    ``data.holdout`` has no held-out data, and the error says so."""
    held_file = Path(run_dir) / "holdout.parquet"
    if not held_file.is_file():
        raise config_mod.ConfigError(
            f"{run_dir}: no held-out data (train the run with --set data.holdout=0.2)")
    data = load_dataset(cfg.data)
    held = pd.read_parquet(held_file)["index"].to_numpy()
    train = np.setdiff1d(np.arange(len(data.labels)), held)
    return (Dataset(data.images[train], data.labels[train], data.class_names),
            Dataset(data.images[held], data.labels[held], data.class_names))


def resolve(cfg: Config, dataset: Dataset) -> Config:
    """The config with ``data.channels`` and ``data.num_classes`` read from the data set
    (when 0), checked against it; a conditional model needs labels."""
    d = cfg.data
    channels = int(dataset.images.shape[1])
    if d.channels and d.channels != channels:
        raise config_mod.ConfigError(f"data.channels = {d.channels}: the data set has {channels}")
    labelled = dataset.labels.min() >= 0
    found = int(dataset.labels.max()) + 1 if labelled else 0
    if d.num_classes and labelled and found > d.num_classes:
        raise config_mod.ConfigError(f"data.num_classes = {d.num_classes}: the labels go up "
                                     f"to {found - 1}")
    if cfg.model.conditional and not labelled:
        raise config_mod.ConfigError("model.conditional = true: the data set has no labels "
                                     f"(data.label_column = {d.label_column!r})")
    if cfg.model.conditional and (d.num_classes or found) < 2:
        raise config_mod.ConfigError("model.conditional = true: the data set has one class; "
                                     "a class-conditional model needs two or more")
    data = dataclasses.replace(d, channels=channels, num_classes=d.num_classes or found)
    cfg = dataclasses.replace(cfg, data=data)
    config_mod.check_attack_files(cfg)  # a trigger file's channels against the data's
    return resolve_pretrained(cfg) if cfg.model.pretrained else cfg


def resolve_pretrained(cfg: Config) -> Config:
    """Check that the pretrained model fits the data and the adapters, and take its noise
    schedule (so attacks, training and sampling all use the one it was trained with)."""
    from ssdiff_ray.model import BETA_SCHEDULES
    from ssdiff_ray.model.pretrained import PretrainedError, check_fit, check_lora_targets, describe

    d = cfg.data
    try:
        info = describe(cfg.model.pretrained)
        check_fit(info, d.image_size, d.channels, cfg.model.conditional, d.num_classes)
        if cfg.train.mode == "lora":
            check_lora_targets(info, config_mod.lora_targets(cfg.lora.target_modules),
                               cfg.lora.rank)
    except PretrainedError as e:
        raise config_mod.ConfigError(str(e)) from None
    s = info.scheduler or {}
    model = cfg.model
    if s.get("beta_schedule") in BETA_SCHEDULES and s.get("num_train_timesteps"):
        model = dataclasses.replace(model, timesteps=int(s["num_train_timesteps"]),
                                    beta_schedule=s["beta_schedule"])
    return dataclasses.replace(cfg, model=model)


def population(cfg: Config) -> pd.DataFrame:
    """The clients' device profiles: the user's table, or a seeded population."""
    from ssdiff_ray.devices import load_population, make_population

    n = cfg.clients.count
    if not cfg.devices.profiles:
        return make_population(n, cfg.seed, cfg.devices.class_mix or None, cfg.devices.cell_m)
    pop = load_population(cfg.devices.profiles)
    if len(pop) < n:
        raise config_mod.ConfigError(
            f"devices.profiles = {cfg.devices.profiles!r}: has {len(pop)} rows, "
            f"clients.count = {n} needs as many")
    return pop.iloc[:n]


def write_summary(run_dir: Path, summary: dict) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
