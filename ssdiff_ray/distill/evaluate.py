"""``ssdiff distill-eval``: edge students trained on distilled sets and on the baselines
(the run's full real training data, a random real subset with the same images per class),
scored on the run's held-out real data, with what each costs an edge device."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ssdiff_ray.distill.student import StudentSpec


@dataclass
class Source:
    name: str
    ipc: int          # images per class (0: the full real set)
    images: np.ndarray
    labels: np.ndarray
    bytes: int


def random_real(images: np.ndarray, labels: np.ndarray, ipc: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """``ipc`` real images per class, drawn without replacement (all, where a class has fewer)."""
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:ipc]
                           for c in np.unique(labels)])
    return images[rows], labels[rows]


def baseline_sources(train_images, train_labels, ipcs, seed: int = 0) -> list[Source]:
    """The full real training set and a random real subset for each K in ``ipcs``."""
    from ssdiff_ray.distill.distilled_set import set_bytes

    out = [Source("real full", 0, train_images, train_labels,
                  set_bytes(train_images, train_labels))]
    for k in sorted(set(ipcs)):
        x, y = random_real(train_images, train_labels, k, seed)
        out.append(Source("real random", k, x, y, set_bytes(x, y)))
    return out


def set_source(path: str | Path) -> Source:
    """A distilled set written by ``ssdiff distill`` as a source."""
    from ssdiff_ray.distill.distilled_set import read_set

    x, y, m = read_set(path)
    return Source(m.get("name") or Path(path).name, int(m["ipc"]), x, y, int(m["bytes"]))


def student_row(source: Source, seed: int, test_images, test_labels, num_classes: int,
                spec: StudentSpec, device: str) -> dict:
    """Train one student on ``source`` and score it (a Ray task's body)."""
    import torch

    from ssdiff_ray.distill.student import accuracy, edge_costs, train_student

    torch.set_num_threads(1)
    spec = replace(spec, seed=seed)
    model = train_student(source.images, source.labels, num_classes, spec)
    return {"source": source.name, "ipc": source.ipc, "images": len(source.labels),
            "bytes": source.bytes, "seed": seed,
            "accuracy": accuracy(model, test_images, test_labels),
            "params": sum(p.numel() for p in model.parameters()),
            **edge_costs(model, spec, source.images.shape[1:], source.bytes, device)}


def evaluate(sources: list[Source], test_images, test_labels, num_classes: int,
             spec: StudentSpec | None = None, seeds=(0, 1, 2), device: str = "rpi4",
             map_fn=map) -> pd.DataFrame:
    """One row per (source, seed); ``map_fn(fn, jobs)`` runs the students (Ray tasks)."""
    spec = spec or StudentSpec()
    jobs = [(s, seed) for s in sources for seed in seeds]
    fn = functools.partial(_job, test_images=test_images, test_labels=test_labels,
                           num_classes=num_classes, spec=spec, device=device)
    return pd.DataFrame(list(map_fn(fn, jobs)))


def _job(job, **kw) -> dict:
    return student_row(job[0], job[1], **kw)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation of accuracy over seeds, per source and K."""
    g = rows.groupby(["source", "ipc"], sort=False)
    out = g.agg(images=("images", "first"), bytes=("bytes", "first"),
                accuracy=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
                seeds=("seed", "count"), train_energy_j=("train_energy_j", "first"),
                train_s=("train_s", "first"), download_energy_j=("download_energy_j", "first"))
    return out.reset_index()
