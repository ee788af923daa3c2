"""Sample quality against one real data set, in one feature space: FID and KID, precision and
recall (Kynkaanniemi et al., 2019), the share of generated images that are not images of the
data set (``bad_sample_share``), and the classifier's reading of the samples.

The feature space is Inception-v3's pool features when a weights file is given, else the
run's own classifier's (``metrics.classifier``). FID, KID and precision/recall are
torch-fidelity's, computed on those features. The failure detector is the classifier's
"not an image of this data set" class.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ssdiff_ray.metrics.classifier import FeatureClassifier, get_classifier
from ssdiff_ray.metrics.inception import InceptionFeatures, InceptionWeightsError


class ClassifierFeatures:
    """Penultimate features of a classifier network."""

    def __init__(self, net: FeatureClassifier, name: str = "classifier", batch_size: int = 256):
        self.net, self.name, self.batch_size = net.eval(), name, batch_size

    @torch.no_grad()
    def features(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.clip(np.asarray(images, np.float32), -1, 1))
        return torch.cat([self.net.embed(b).double() for b in x.split(self.batch_size)])


class FailureDetector:
    """An image is a failure, "not an image of the data set", when the feature classifier
    gives its last class ("not data", learned from synthetic corruptions) a probability
    above 1/2 and above what it gives all but ``real_fpr`` of held-out real images (so at
    most that share of real images is flagged)."""

    def __init__(self, not_data_prob, held_out_images: np.ndarray, real_fpr: float = 0.01):
        self.prob = not_data_prob
        self.threshold = max(0.5, float(np.quantile(self.prob(held_out_images), 1 - real_fpr)))

    def flags(self, images: np.ndarray) -> np.ndarray:
        return self.prob(images) > self.threshold


class QualityEvaluator:
    """The data is split once (stratified by label when there are labels, seeded): the train
    split trains the classifier and is the reference; the held-out split (>= 300 images
    when the data set has 600+) calibrates the failure detector and gives the FID floor,
    what a perfect generator would score at that n."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, inception_weights: str = "",
                 held_out_fraction: float = 0.2, seed: int = 0, cache_dir=None):
        from sklearn.model_selection import train_test_split

        images = np.asarray(images, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.int64)
        labelled = bool(labels.min() >= 0)
        n = len(images)
        n_held = max(round(held_out_fraction * n), min(300, n // 2))
        idx_tr, idx_ho = train_test_split(np.arange(n), test_size=n_held, random_state=seed,
                                          stratify=labels if labelled else None)
        self.train_images, self.train_labels = images[idx_tr], labels[idx_tr]
        self.held_images, self.held_labels = images[idx_ho], labels[idx_ho]
        t0 = time.perf_counter()
        self.classifier = get_classifier(self.train_images, self.train_labels, cache_dir)
        self.classifier_seconds = time.perf_counter() - t0  # train or load time
        self.num_classes = self.classifier.num_classes if labelled else 0
        self.space = self._feature_space(inception_weights)
        self.feature_space = self.space.name
        self.ref = self.space.features(self.train_images)
        from torch_fidelity.metric_fid import fid_features_to_statistics

        self.ref_stats = fid_features_to_statistics(self.ref)
        self.detector = FailureDetector(self.not_data_probability, self.held_images)

    def _feature_space(self, inception_weights: str):
        if inception_weights:
            try:
                return InceptionFeatures(inception_weights)
            except InceptionWeightsError as e:
                warnings.warn(f"{e}; FID falls back to the classifier's space", stacklevel=3)
        return ClassifierFeatures(self.classifier)

    # --- metrics --------------------------------------------------------------------------
    def fid(self, images: np.ndarray) -> float:
        """Frechet distance to the reference; inf if any pixel is NaN/inf (a diverged model)."""
        if not np.isfinite(images).all():
            return float("inf")
        return self._fid(self.space.features(images))

    def _fid(self, feats: torch.Tensor) -> float:
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

        if len(feats) < 2:
            raise ValueError("FID needs at least 2 images")
        out = fid_statistics_to_metric(self.ref_stats, fid_features_to_statistics(feats), False)
        return max(0.0, float(out["frechet_inception_distance"]))

    def _kid_pr(self, feats: torch.Tensor, seed: int = 0) -> dict:
        """KID, precision and recall (k = 3) against an equally large real subset."""
        from torch_fidelity.metric_kid import kid_features_to_metric
        from torch_fidelity.metric_prc import prc_features_to_metric

        rng = np.random.default_rng(seed)
        real = self.ref[torch.from_numpy(rng.permutation(len(self.ref))[:len(feats)])]
        m = min(len(feats), len(real), 1000)
        kid = kid_features_to_metric(feats, real, kid_subsets=50, kid_subset_size=m,
                                     verbose=False, rng_seed=seed)
        prc = prc_features_to_metric(feats.float(), real.float(), prc_neighborhood=3,
                                     prc_batch_size=10000, save_cpu_ram=False, verbose=False)
        return {"kid": kid["kernel_inception_distance_mean"], "precision": prc["precision"],
                "recall": prc["recall"]}

    def evaluate(self, images: np.ndarray, labels: np.ndarray | None = None,
                 min_share: float = 0.01) -> dict:
        """FID, KID, precision, recall in ``feature_space``; ``bad_sample_share`` (the
        failure detector); from the classifier: ``confidence`` (mean max softmax),
        ``class_histogram``,
        ``classes_present`` (classes predicted for at least max(1, ceil(min_share * n))
        samples), and with the requested ``labels`` of conditional samples
        ``class_accuracy``, the share classified as their requested class."""
        images = np.asarray(images, dtype=np.float32)
        finite = bool(np.isfinite(images).all())
        images = np.nan_to_num(images, nan=0.0, posinf=1.0, neginf=-1.0)
        feats = self.space.features(images)
        out = {"fid": self._fid(feats) if finite else float("inf"),
               **(self._kid_pr(feats) if len(feats) >= 4 else {}),
               "bad_sample_share": float(self.detector.flags(images).mean()),
               "n": len(images), "feature_space": self.feature_space}
        if self.num_classes:
            probs = self.class_probabilities(images)
            hist = np.bincount(probs.argmax(1), minlength=self.num_classes)
            out.update(confidence=float(probs.max(1).mean()), class_histogram=hist.tolist(),
                       classes_present=int((hist >= max(1, int(np.ceil(min_share * len(probs))))
                                            ).sum()))
            if labels is not None:
                out["class_accuracy"] = float((probs.argmax(1) == np.asarray(labels)).mean())
        return out

    @torch.no_grad()
    def _probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax over the data set's classes and, last, "not data"."""
        x = torch.from_numpy(np.clip(np.asarray(images, np.float32), -1, 1))
        return torch.cat([F.softmax(self.classifier(b), 1) for b in x.split(256)]).numpy()

    def class_probabilities(self, images: np.ndarray) -> np.ndarray:
        """The data set's K classes' probabilities, given the image is one of the data set."""
        p = self._probabilities(images)[:, :-1]
        return p / np.maximum(p.sum(1, keepdims=True), 1e-12)

    def not_data_probability(self, images: np.ndarray) -> np.ndarray:
        return self._probabilities(images)[:, -1]

    def accuracy(self) -> float:
        """Classifier accuracy on the held-out split."""
        return float((self.class_probabilities(self.held_images).argmax(1)
                      == self.held_labels).mean())

    def fid_floor(self) -> float:
        """FID of the real held-out images: the best a generator can expect at this n."""
        return self.fid(self.held_images)

    def fid_of_noise(self, n: int | None = None, seed: int = 0) -> float:
        """FID of N(0, 1) noise clipped to [-1, 1] (n defaults to the held-out size)."""
        n = len(self.held_images) if n is None else n
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal((n, *self.held_images.shape[1:])).astype(np.float32)
        return self.fid(np.clip(noise, -1.0, 1.0))
