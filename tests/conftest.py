"""Shared fixtures: one real local Ray for the session, tiny configs, a temp cache."""

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    # The FID classifier cache: one per test session, never the user's.
    if "SSDIFF_CACHE_DIR" not in os.environ:
        os.environ["SSDIFF_CACHE_DIR"] = str(tmp_path_factory.mktemp("ssdiff-cache"))
    yield


@pytest.fixture(scope="session")
def ray_local():
    """A real embedded Ray with 2 CPUs, shared by the tests that need one."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


TINY = [
    "model.preset=tiny", "model.timesteps=100", "clients.count=6", "clients.per_round=1.0",
    "clients.pools=2", "train.local_steps=2", "train.batch_size=8", "data.image_size=16",
    "eval.samples=40", "eval.steps=4", "eval.grid=16", "eval.baseline=false",
    "defense.estimate_gen_steps=2",
]


@pytest.fixture
def tiny_overrides(tmp_path):
    return [*TINY, f"out_dir={tmp_path}"]
