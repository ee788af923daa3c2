"""Adding an aggregation rule is one new file and one registry line: its options become
config keys (checked against their ranges) with no edit of ``config.py``."""

import textwrap

import numpy as np
import pytest

from ssdiff_ray import config
from ssdiff_ray.aggregation import AGGREGATORS, make_aggregator
from ssdiff_ray.aggregation.base import ClientUpdate

RULE = '''
"""Drops every update whose L2 norm exceeds ``norm_cap``; FedAvg over the rest."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssdiff_ray.aggregation.screened import ScreenedFedAvg
from ssdiff_ray.options import option, options_of


@dataclass
class Options:
    norm_cap: float = option(1.0, lo=0.0, lo_open=True, hi=1e9, doc="largest norm kept")


class NormCap(ScreenedFedAvg):
    name = "norm_cap"
    Options = Options

    def __init__(self, num_params, num_slots, lr=1.0, norm_cap=1.0):
        super().__init__(num_params, num_slots, lr)
        self.norm_cap = norm_cap

    @classmethod
    def from_config(cls, server, num_params, num_slots):
        return cls(num_params, num_slots, server.lr, options_of(Options, server).norm_cap)

    def screen(self, deltas, weights):
        keep = np.linalg.norm(deltas, axis=1) <= self.norm_cap
        return keep, ["" if k else "over the cap" for k in keep]
'''


@pytest.fixture
def new_rule(tmp_path, monkeypatch):
    (tmp_path / "norm_cap_rule.py").write_text(textwrap.dedent(RULE))   # the new file
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(AGGREGATORS, "norm_cap", "norm_cap_rule:NormCap")  # the registry line


def test_a_new_rule_and_its_option_need_no_config_edit(new_rule):
    cfg = config.load(None, ["server.aggregator=norm_cap", "server.norm_cap=2.5"])
    assert cfg.server.options["norm_cap"] == 2.5
    assert "norm_cap = 2.5" in config.to_toml(cfg)          # written to the run's config.toml
    assert config.from_dict(cfg.to_dict()) == cfg           # and read back
    rule = make_aggregator(cfg.server, num_params=3, num_slots=1)
    rule.begin_round(np.zeros(3, dtype=np.float32))
    for cid, delta in enumerate(([1.0, 0, 0], [0, 1.0, 0], [100.0, 0, 0])):
        rule.add(ClientUpdate(cid, 0, np.array(delta, dtype=np.float32)), 1.0)
    result = rule.finish()
    np.testing.assert_allclose(result.weights, [0.5, 0.5, 0.0])  # the outlier was dropped
    assert not result.verdicts[2].kept and result.verdicts[2].reason == "over the cap"


def test_a_new_rules_option_is_checked_like_any_config_field(new_rule):
    with pytest.raises(config.ConfigError, match=r"server.norm_cap = -1.0: must be in \(0, 1e\+09\]"):
        config.load(None, ["server.aggregator=norm_cap", "server.norm_cap=-1"])
    with pytest.raises(config.ConfigError, match="unknown config key 'server.norm_capp'.*norm_cap"):
        config.load(None, ["server.norm_capp=1"])


def test_without_the_registry_line_the_rule_and_its_option_are_unknown():
    with pytest.raises(config.ConfigError, match="server.aggregator = 'norm_cap': must be one of"):
        config.load(None, ["server.aggregator=norm_cap"])
    with pytest.raises(config.ConfigError, match="unknown config key 'server.norm_cap'"):
        config.load(None, ["server.norm_cap=2"])
