"""The run's own feature network: a small CNN classifier trained on the run's data (any
channel count), cached on disk by a hash of the data and the recipe.

Its classes are the data set's K classes (one class "data" when it has no labels) plus one
more, "not an image of this data set", learned from synthetic corruptions (Gaussian and
salt-and-pepper noise, flat images, real images drowned in noise). That class is the
failure detector of evaluations, and it teaches the feature space to keep garbage away
from real images, which a space trained on the classes alone does not (there, 30% of pure
noise landed next to real digits). It gives the fallback feature space for FID when no
Inception-v3 weights are at hand, and the class predictions (confidence, classes present,
class accuracy of conditional samples). Figures in its space compare only within one data
set, image size and ARCH_VERSION.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ARCH_VERSION = 3  # bump when the network or its training changes: old cache files are ignored
FEATURE_DIM = 64
_EPOCHS, _BATCH, _LR, _SEED = 20, 64, 2e-3, 0
_CORRUPT = 16  # synthetic "not data" images per batch of _BATCH real ones


class FeatureClassifier(nn.Module):
    """Three conv layers, a 64-dim feature layer (used for FID) and a linear head over the
    data set's ``num_classes`` classes and, last, "not an image of this data set"."""

    def __init__(self, num_classes: int = 10, channels: int = 1):
        super().__init__()
        self.num_classes, self.channels = num_classes, channels
        self.not_data = num_classes  # the index of the last class
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),  # any input size S >= 4 maps to the same head
        )  # fmt: skip
        self.feature = nn.Linear(64 * 16, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes + 1)
        self.from_cache = False  # set by get_classifier: True when weights were loaded

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, before the ReLU (a denser, better-conditioned Gaussian)."""
        return self.feature(self.conv(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.embed(x)))


@contextlib.contextmanager
def _one_thread():
    # Float reductions depend on the thread count; one thread makes training reproducible.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random per-image shift of -1..1 px in x and y, filling with background (-1)."""
    b, c, s, _ = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(s))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(s))[:, None, None, :]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows, cols]


def corruptions(real: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` images that are not images of the data set: Gaussian noise (any scale and
    offset), salt-and-pepper, flat colours, and real images drowned in noise."""
    shape = real.shape[1:]
    one = (n, 1, 1, 1)
    gauss = torch.randn((n, *shape), generator=gen) * (0.3 + 1.7 * torch.rand(one, generator=gen))
    gauss = gauss + (torch.rand(one, generator=gen) * 2 - 1) * 0.5
    density = 0.1 + 0.5 * torch.rand(one, generator=gen)
    salt = torch.where(torch.rand((n, *shape), generator=gen) < density, 1.0, -1.0)
    flat = (torch.rand((n, shape[0], 1, 1), generator=gen) * 2 - 1).expand(n, *shape)
    idx = torch.randint(0, len(real), (n,), generator=gen)
    drowned = real[idx] + torch.randn((n, *shape), generator=gen) * (
        0.5 + torch.rand(one, generator=gen))
    kind = torch.randint(0, 4, (n,), generator=gen)
    out = torch.stack([gauss, salt, flat, drowned])[kind, torch.arange(n)]
    return out.clamp(-1, 1)


def train_classifier(images: np.ndarray, labels: np.ndarray) -> FeatureClassifier:
    """Adam on shifted, lightly noised images and synthetic corruptions (the last class);
    seeded and single-threaded, so reproducible. ``labels`` of -1: one class, "data"."""
    x, y = torch.tensor(images), torch.tensor(np.maximum(labels, 0))  # copies: may be read-only
    with torch.random.fork_rng(devices=[]), _one_thread():  # leave the caller's RNG alone
        torch.manual_seed(_SEED)
        model = FeatureClassifier(int(y.max()) + 1, x.shape[1])
        gen = torch.Generator().manual_seed(_SEED)
        opt = torch.optim.Adam(model.parameters(), lr=_LR)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, _EPOCHS * -(-len(x) // _BATCH))
        not_data = torch.full((_CORRUPT,), model.not_data)
        model.train()
        for _ in range(_EPOCHS):
            for idx in torch.randperm(len(x), generator=gen).split(_BATCH):
                # Noise (sigma 0.1) so slightly noisy DDPM samples are still read as images.
                xb = (_shift(x[idx], gen) + 0.1 * torch.randn(x[idx].shape, generator=gen)).clamp(-1, 1)
                xb = torch.cat([xb, corruptions(x, _CORRUPT, gen)])
                loss = F.cross_entropy(model(xb), torch.cat([y[idx], not_data]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


def default_cache_dir() -> Path:
    """$SSDIFF_CACHE_DIR, else $XDG_CACHE_HOME/ssdiff-ray, else ~/.cache/ssdiff-ray."""
    if d := os.environ.get("SSDIFF_CACHE_DIR"):
        return Path(d)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "ssdiff-ray"


def cache_key(images: np.ndarray, labels: np.ndarray) -> str:
    """Hash of the training data, architecture version and training recipe."""
    h = hashlib.sha256(f"v{ARCH_VERSION}|{_EPOCHS},{_BATCH},{_LR},{_SEED}".encode())
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:24]


def get_classifier(images: np.ndarray, labels: np.ndarray,
                   cache_dir: str | Path | None = None) -> FeatureClassifier:
    """The classifier for this training set (N x C x S x S in [-1, 1], labels 0..K-1, or all
    -1 for unlabelled data): loaded from the cache, else trained and cached.

    ``model.from_cache`` tells which happened. The file is written to a temporary name and
    renamed, so concurrent processes each write a whole file and readers never see half of one.
    """
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 4:
        raise ValueError(f"images have shape {images.shape}, expected N x C x S x S")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"fid_classifier_{cache_key(images, labels)}.pt"
    if path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = FeatureClassifier(int(state["num_classes"]), int(state["channels"]))
            model.load_state_dict(state["weights"])
            model.from_cache = True
            return model.eval()
        except Exception as e:  # noqa: BLE001 - an unreadable cache file is rebuilt, not fatal
            warnings.warn(f"feature classifier cache {path} unreadable ({e}); retraining",
                          stacklevel=2)
    model = train_classifier(images, labels)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"num_classes": model.num_classes, "channels": model.channels,
                        "weights": model.state_dict()}, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return model
