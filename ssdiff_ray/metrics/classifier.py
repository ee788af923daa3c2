"""Sample quality: FID in the feature space of a small digit classifier trained on the dataset.

Inception-v3 FID needs downloaded weights and 299 x 299 RGB inputs; for 16 x 16 grayscale
digits a small CNN trained here (deterministically, cached on disk) gives a feature space that
actually separates the classes. Numbers are comparable only within one dataset, image size
and ARCH_VERSION, and between sample sets of similar size (FID is biased upward for small n).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ARCH_VERSION = 1  # bump when the network or its training changes: old cache files are ignored
FEATURE_DIM = 64
_EPOCHS, _BATCH, _LR, _SEED = 20, 64, 2e-3, 0


class DigitClassifier(nn.Module):
    """Three conv layers, a 64-dim feature layer (used for FID) and a linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),  # any input size S >= 4 maps to the same head
        )  # fmt: skip
        self.feature = nn.Linear(64 * 16, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)
        self.from_cache = False  # set by get_classifier: True when weights were loaded

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, before the ReLU (a denser, better-conditioned Gaussian)."""
        return self.feature(self.conv(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.embed(x)))


FeatureNet = DigitClassifier  # the name callers use for "the network FID is measured in"


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
    b, _, s, _ = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)[:, 0]
    dy, dx = torch.randint(0, 3, (2, b), generator=gen)
    rows = dy[:, None] + torch.arange(s)
    cols = dx[:, None] + torch.arange(s)
    return padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]][:, None]


def train_classifier(images: np.ndarray, labels: np.ndarray) -> DigitClassifier:
    """Adam on shifted, lightly noised images; seeded and single-threaded, so reproducible."""
    x, y = torch.tensor(images), torch.tensor(labels)  # copies: input may be read-only
    with torch.random.fork_rng(devices=[]), _one_thread():  # leave the caller's RNG alone
        torch.manual_seed(_SEED)
        model = DigitClassifier(int(labels.max()) + 1)
        gen = torch.Generator().manual_seed(_SEED)
        opt = torch.optim.Adam(model.parameters(), lr=_LR)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, _EPOCHS * -(-len(x) // _BATCH))
        model.train()
        for _ in range(_EPOCHS):
            for idx in torch.randperm(len(x), generator=gen).split(_BATCH):
                # Noise (sigma 0.1) so slightly noisy DDPM samples are still read as digits.
                xb = _shift(x[idx], gen) + 0.1 * torch.randn(x[idx].shape, generator=gen)
                loss = F.cross_entropy(model(xb.clamp(-1, 1)), y[idx])
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


def cache_key(images: np.ndarray, labels: np.ndarray, image_size: int) -> str:
    """Hash of the training data, architecture version, training recipe and image size."""
    h = hashlib.sha256(f"v{ARCH_VERSION}|{image_size}|{_EPOCHS},{_BATCH},{_LR},{_SEED}".encode())
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:24]


def get_classifier(
    images: np.ndarray, labels: np.ndarray, image_size: int, cache_dir: str | Path | None = None
) -> FeatureNet:
    """The classifier for this training set: loaded from the cache, else trained and cached.

    ``model.from_cache`` tells which happened. The file is written to a temporary name and
    renamed, so concurrent processes each write a whole file and readers never see half of one.
    """
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or images.shape[1:] != (1, image_size, image_size):
        raise ValueError(f"images have shape {images.shape}, expected N x 1 x {image_size}^2")
    if labels.min() < 0 or len(np.unique(labels)) < 2:
        raise ValueError("the FID classifier needs labels >= 0 with at least two classes")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"fid_classifier_{cache_key(images, labels, image_size)}.pt"
    if path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = DigitClassifier(int(state["num_classes"]))
            model.load_state_dict(state["weights"])
            model.from_cache = True
            return model.eval()
        except Exception as e:  # noqa: BLE001 - an unreadable cache file is rebuilt, not fatal
            warnings.warn(f"FID classifier cache {path} unreadable ({e}); retraining", stacklevel=2)
    model = train_classifier(images, labels)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"num_classes": model.num_classes, "weights": model.state_dict()}, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return model


def frechet_distance(
    mu1: np.ndarray, sqrt_s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray
) -> float:
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), with sqrt_s1 the PSD root of S1.

    tr sqrt(S1 S2) = sum of sqrt(eigenvalues of sqrt(S1) S2 sqrt(S1)), a symmetric PSD
    matrix, so eigvalsh is stable and real where scipy's sqrtm of S1 S2 can go complex.
    """
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    tr_s1 = np.trace(sqrt_s1 @ sqrt_s1)
    d = float(((mu1 - mu2) ** 2).sum() + tr_s1 + np.trace(s2) - 2.0 * tr_cross)
    return max(d, 0.0)  # rounding can leave tiny negatives for identical sets


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


class QualityEvaluator:
    """FID and class statistics of generated images against one real dataset.

    The data is split once (stratified, seeded): the train split trains the classifier and is
    the FID reference; the held-out split (>= 300 images when the dataset has 600+) measures
    classifier accuracy and the FID floor, i.e. what a perfect generator would score.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        held_out_fraction: float = 0.2,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        batch_size: int = 256,
    ):
        from sklearn.model_selection import train_test_split

        images = np.asarray(images, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.int64)
        n = len(images)
        n_held = max(round(held_out_fraction * n), min(300, n // 2))
        idx_tr, idx_ho = train_test_split(
            np.arange(n), test_size=n_held, stratify=labels, random_state=seed
        )
        self.image_size = int(images.shape[-1])
        self.batch_size = batch_size
        self.train_images, self.train_labels = images[idx_tr], labels[idx_tr]
        self.held_images, self.held_labels = images[idx_ho], labels[idx_ho]
        t0 = time.perf_counter()
        self.classifier = get_classifier(
            self.train_images, self.train_labels, self.image_size, cache_dir
        )
        self.classifier_seconds = time.perf_counter() - t0  # train or load time
        self.num_classes = self.classifier.num_classes
        ref = self.features(self.train_images).astype(np.float64)
        self.ref_mu, self.ref_sigma = ref.mean(0), np.cov(ref, rowvar=False)
        self._ref_sqrt = _psd_sqrt(self.ref_sigma)  # computed once, reused by every fid()

    def _forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features, logits) in fixed-size batches; images are clipped to [-1, 1] first."""
        x = np.asarray(images, dtype=np.float32).reshape(-1, 1, self.image_size, self.image_size)
        x = torch.from_numpy(np.clip(x, -1.0, 1.0))
        feats, logits = [], []
        with torch.no_grad():
            for xb in x.split(self.batch_size):
                f = self.classifier.embed(xb)
                feats.append(f)
                logits.append(self.classifier.head(F.relu(f)))
        return torch.cat(feats).numpy(), torch.cat(logits).numpy()

    def features(self, images: np.ndarray) -> np.ndarray:
        """N x 64 classifier features of N images (N x 1 x S x S or N x S x S)."""
        return self._forward(images)[0]

    def _fid_from_features(self, feats: np.ndarray) -> float:
        if len(feats) < 2:
            raise ValueError("FID needs at least 2 images")
        f = feats.astype(np.float64)
        return frechet_distance(self.ref_mu, self._ref_sqrt, f.mean(0), np.cov(f, rowvar=False))

    def fid(self, images: np.ndarray) -> float:
        """Fréchet distance to the reference; inf if any pixel is NaN/inf (a diverged model)."""
        if not np.isfinite(images).all():
            return float("inf")
        return self._fid_from_features(self.features(images))

    def evaluate(self, images: np.ndarray, min_share: float = 0.01) -> dict:
        """``fid``, ``confidence`` (mean max softmax), ``class_histogram`` (argmax counts), ``n``
        and ``classes_present``: classes predicted for at least max(1, ceil(min_share * n))
        samples, so a few stray predictions do not count as a generated class. The classifier
        errs on ~2% of real digits, mostly into one look-alike class, so a one-class set can
        show 2 classes at the default 1%; raise min_share to test for mode collapse strictly."""
        finite = bool(np.isfinite(images).all())
        feats, logits = self._forward(np.nan_to_num(np.asarray(images), nan=0.0))
        probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
        hist = np.bincount(probs.argmax(1), minlength=self.num_classes)
        threshold = max(1, int(np.ceil(min_share * len(probs))))
        return {
            "fid": self._fid_from_features(feats) if finite else float("inf"),
            "confidence": float(probs.max(1).mean()),
            "classes_present": int((hist >= threshold).sum()),
            "class_histogram": hist.tolist(),
            "n": len(probs),
        }

    def accuracy(self) -> float:
        """Classifier accuracy on the held-out split."""
        logits = self._forward(self.held_images)[1]
        return float((logits.argmax(1) == self.held_labels).mean())

    def fid_floor(self) -> float:
        """FID of the real held-out images: the best a generator can expect at this n."""
        return self.fid(self.held_images)

    def fid_of_noise(self, n: int | None = None, seed: int = 0) -> float:
        """FID of N(0, 1) noise clipped to [-1, 1] (n defaults to the held-out size)."""
        n = len(self.held_images) if n is None else n
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal((n, 1, self.image_size, self.image_size)).astype(np.float32)
        return self.fid(np.clip(noise, -1.0, 1.0))
