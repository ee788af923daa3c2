"""Shared fixtures: one real local Ray for the session, tiny configs, a temp cache."""

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    # The FID classifier cache: one per test session, never the user's; shared by the
    # pytest-xdist workers of the session (its files are written whole and renamed).
    if "SSDIFF_CACHE_DIR" not in os.environ:
        root = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            root = root.parent
        os.environ["SSDIFF_CACHE_DIR"] = str(root / "ssdiff-cache")
    yield


@pytest.fixture(scope="session")
def ray_local():
    """A real embedded Ray with 2 CPUs, shared by the tests that need one."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    from ssdiff_ray.driver import warm

    warm.release()  # kept actors, and their timer, go before Ray does
    ray.shutdown()


TINY = [
    "model.preset=tiny", "model.timesteps=100", "clients.count=6", "clients.per_round=1.0",
    "clients.pools=1", "train.local_steps=2", "train.batch_size=8", "data.image_size=16",
    "eval.samples=40", "eval.steps=4", "eval.grid=16", "eval.baseline=false",
    "defense.estimate_gen_steps=2",
    "train.warmup_steps=0",   # 2 local steps: the default warm-up would keep them at lr / 4
]
# One pool: each actor process costs ~6 s of CPU (torch, diffusers) on a 2-core CI; the
# tests about several pools (a killed pool, chunk order, resume) ask for them.
TWO_POOLS = "clients.pools=2"


@pytest.fixture
def tiny_overrides(tmp_path):
    return [*TINY, f"out_dir={tmp_path}"]


def pytest_collection_modifyitems(session, config, items):
    """Files holding slow tests first: with ``-n 2 --dist loadfile`` (README's command) the
    longest files start at once instead of leaving one worker busy at the end."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: file order kept otherwise


CHROMIUM = "/usr/bin/chromium"  # Debian's; CI installs it (Playwright's own download is offline here)


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by Playwright (the flags keep it off the closed network)."""
    import os

    if not os.path.exists(CHROMIUM):
        if os.environ.get("SSDIFF_REQUIRE_BROWSER"):  # CI installs it: never skip there
            pytest.fail(f"{CHROMIUM} missing (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page; fails the test on any script error or console error (a CSP
    violation included)."""
    pg = browser.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    pg.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
    yield pg
    pg.close()
    # Chromium logs every 4xx answer as a console error: those are the API's, by design
    assert not [p for p in problems if "responded with a status of 4" not in p], problems
