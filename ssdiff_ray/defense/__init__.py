"""The sampling-stage backdoor defense, one part per file:

* ``estimate``: the estimated trigger distribution (``TriggerEstimate``) from an estimator:
  ``probe`` (read the backdoor's decision region) or ``scan`` (a patch scan), one file each;
* ``input_tests``: is an initial noise triggered (likelihood ratio, model-free test,
  output checks);
* ``negation``: clean or redraw flagged inputs, then sample;
* ``audit``: does the model itself look backdoored;
* ``defense``: ``Defense.from_config``, the chain the run's evaluation, ``ssdiff sample``
  and ``ssdiff audit`` share.

This file is torch-free: the config reads the estimator list on the driver.
"""

from __future__ import annotations

from ssdiff_ray.registry import load

# what a flagged input becomes (``negation.defended_sample``)
NEGATIONS = ("redraw", "subtract")

ESTIMATORS = {
    "probe": "ssdiff_ray.defense.probe:ProbeEstimator",
    "scan": "ssdiff_ray.defense.scan:ScanEstimator",
}


def make_estimator(defense):
    """The trigger estimator the ``[defense]`` config section names."""
    return load(ESTIMATORS[defense.estimator]).from_config(defense)
