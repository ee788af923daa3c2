"""Sample-quality metrics: FID, KID, precision/recall and the failure share in Inception-v3's
feature space (``inception``, a local weights file) or the run's own classifier's
(``classifier``), evaluated by ``quality.QualityEvaluator``."""
