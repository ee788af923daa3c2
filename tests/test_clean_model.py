"""The audit on a tiny clean model trained with the backdoored one's recipe
(tests/test_backdoored_model.py): no cluster under either sampler, verdict clean, and
``cleanse`` refuses it. Its own file, so that a parallel test run trains the two models at
once."""

import json

import pytest
from backdoor_recipe import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def clean_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("models"), "clean", [])


def test_clean_model_of_the_same_recipe_is_audited_clean(clean_run):
    from ssdiff_ray.inference import RunModelError, audit_run, cleanse_run

    audit = audit_run(clean_run)
    assert audit["verdict"] == "clean", audit
    stats = json.loads((clean_run / "defense" / "estimate.json").read_text())["stats"]
    assert stats["cluster_fraction_by_sampler"] == {"ddim": 0, "dpm": 0}  # none under either
    # cleanse refuses it (its estimate is spurious) and writes nothing
    out = clean_run.with_name("clean-cleansed")
    with pytest.raises(RunModelError, match="the audit says 'clean'.*--force"):
        cleanse_run(clean_run, out)
    assert not out.exists()
