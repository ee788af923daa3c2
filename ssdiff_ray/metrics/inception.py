"""Inception-v3 pool features (2048-d), the field's FID/KID feature space, from a local
weights file: torch-fidelity's network (the one torchmetrics' FID uses), never downloaded
at run time."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ssdiff_ray.errors import UserError

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               + WEIGHTS_FILE)
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the name ends in its hash's start


class InceptionWeightsError(UserError):
    """A weights path that is missing or not torch-fidelity's Inception-v3; one line."""


class InceptionFeatures:
    """``features(images)``: N x 2048 pool features of images in [-1, 1] (1 or 3 channels,
    any size: grey is repeated to RGB, the network resizes to 299 x 299 itself)."""

    name = "inception"

    def __init__(self, weights_path: str | Path, batch_size: int = 64):
        path = Path(weights_path)
        if not path.is_file():
            raise InceptionWeightsError(
                f"eval.inception_weights = {str(weights_path)!r}: no such file (the Inception-v3 "
                f"weights torchmetrics uses, {WEIGHTS_FILE}, from {WEIGHTS_URL})")
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        check_weights_file(path, f"eval.inception_weights = {str(weights_path)!r}")
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                   feature_extractor_weights_path=str(path))
        except Exception as e:  # noqa: BLE001 - any unreadable or mismatched file: one line
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise InceptionWeightsError(
                f"eval.inception_weights = {str(weights_path)!r}: not torch-fidelity's "
                f"Inception-v3 weights ({first})") from None
        self.batch_size = batch_size

    @torch.no_grad()
    def features(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.clip(np.asarray(images, np.float32), -1, 1))
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = ((x + 1) * 127.5).round().to(torch.uint8)  # the network's input: RGB bytes
        return torch.cat([self.net(b)[0].double() for b in x.split(self.batch_size)])


def check_weights_file(path: Path, what: str) -> None:
    """A file named as the published weights must have their SHA-256; any file must load as
    plain tensors (``torch.load(weights_only=True)``, which runs no code). torch-fidelity
    then reads it with ``weights_only=False``: safe once the restricted load has passed."""
    if path.name == WEIGHTS_FILE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if not h.hexdigest().startswith(WEIGHTS_SHA256_PREFIX):
            raise InceptionWeightsError(f"{what}: its SHA-256 is not the published file's "
                                        f"({WEIGHTS_SHA256_PREFIX}...)")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a pickle with code, a truncated file, ...
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise InceptionWeightsError(f"{what}: not a plain weights file, refused unread "
                                    f"(loading it could run code: {first})") from None
