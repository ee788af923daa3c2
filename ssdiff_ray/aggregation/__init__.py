"""Aggregation rules: how the parameter server turns a round's updates into new weights.

One rule per file, each an ``Aggregator`` (``base``); the list below is the one place
rules are registered (``server.aggregator`` reads it).
"""

from __future__ import annotations

from ssdiff_ray.registry import load

AGGREGATORS = {
    "fedavg": "ssdiff_ray.aggregation.fedavg:FedAvg",
    "fedavgm": "ssdiff_ray.aggregation.fedavgm:FedAvgM",
    "fedadam": "ssdiff_ray.aggregation.fedadam:FedAdam",
    "fedyogi": "ssdiff_ray.aggregation.fedyogi:FedYogi",
    "fedadagrad": "ssdiff_ray.aggregation.fedadagrad:FedAdagrad",
    "norm_bound": "ssdiff_ray.aggregation.norm_bound:NormBound",
    "multi_krum": "ssdiff_ray.aggregation.multi_krum:MultiKrum",
    "flame": "ssdiff_ray.aggregation.flame:Flame",
}


def make_aggregator(server, num_params: int, num_slots: int):
    """The rule named by ``server.aggregator`` (the ``[server]`` config section)."""
    return load(AGGREGATORS[server.aggregator]).from_config(server, num_params, num_slots)
