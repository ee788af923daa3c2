"""Bounds of the FID metric on digits: the floor (real held-out), noise, classifier accuracy/time.

Trains the classifier in a fresh temporary cache so the training time is measured, then
loads it again to time a cache hit. Writes benchmarks/results/fid_bounds.json.

    python benchmarks/fid_bounds.py [--image-size 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from provenance import args_config, write_json  # noqa: E402

from ssdiff_ray.data.digits import load_digits
from ssdiff_ray.metrics.classifier import ARCH_VERSION
from ssdiff_ray.metrics.quality import QualityEvaluator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results/fid_bounds.json")
    args = ap.parse_args()

    images, labels = load_digits(args.image_size)
    with tempfile.TemporaryDirectory() as cache:
        ev = QualityEvaluator(images, labels, cache_dir=cache)
        assert not ev.classifier.from_cache
        loaded = QualityEvaluator(images, labels, cache_dir=cache)
        assert loaded.classifier.from_cache
    t0 = time.perf_counter()
    floor = ev.fid_floor()
    fid_seconds = time.perf_counter() - t0
    held = ev.evaluate(ev.held_images)
    result = {
        "image_size": args.image_size,
        "arch_version": ARCH_VERSION,
        "n_reference": len(ev.train_images),
        "n_held_out": len(ev.held_images),
        "classifier_accuracy": ev.accuracy(),
        "classifier_train_seconds": ev.classifier_seconds,
        "classifier_load_seconds": loaded.classifier_seconds,
        "fid_floor": floor,
        "fid_noise": ev.fid_of_noise(len(ev.held_images), seed=0),
        "fid_noise_seed1": ev.fid_of_noise(len(ev.held_images), seed=1),
        "fid_seconds_per_call": fid_seconds,
        "held_out_confidence": held["confidence"],
        "held_out_classes_present": held["classes_present"],
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    for k, v in result.items():
        print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")
    write_json(args.out, result, args_config(args))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
