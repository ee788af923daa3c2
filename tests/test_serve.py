"""The generation service: a tiny conditional model served on real Ray Serve, real HTTP
requests (images, metadata, flags, budgets, bad requests), a real load test, and a stop
that frees the port and the actors."""

import base64
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from conftest import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.usefixtures("ray_local")
KEY = "k" * 24  # the API key of the keyed redeploy (test_api_keys_and_hidden_flags on)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ray_local):
    """A tiny class-conditional model trained federatedly, with its serve profile."""
    from ssdiff_ray import api, config
    from ssdiff_ray.service.profile import profile_run

    out = tmp_path_factory.mktemp("serve")
    cfg = config.load(None, [*TINY, f"out_dir={out}", "name=served", "rounds=2", "clients.pools=1",
                             "model.conditional=true", "eval.steps=4"])
    run_dir = api.run(cfg, progress=False)["run_dir"]
    profile_run(run_dir, ("ddim", "dpm"), (2, 4, 8), n=40, batch=8, log=lambda m: None)
    return run_dir


@pytest.fixture(scope="module")
def service(tiny_run):
    from ssdiff_ray.service import app

    port = _free_port()
    # show_flags: the operator's view, the tests read the defense's flags
    url = app.start(tiny_run, port=port, max_batch_size=8, batch_wait_timeout_s=0.05, max_n=16,
                    max_image_steps=1000, show_flags=True)
    yield url
    app.stop()


def _assert_nobody_listens(port: int) -> None:
    """A server can listen on the port again (SO_REUSEADDR, as servers do: the closed
    connections' TIME_WAIT entries do not count, a live listener does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def _post(url, body, **kw):
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return requests.post(f"{url}/generate", data=data, timeout=120, **kw)


def _images(resp) -> np.ndarray:
    from ssdiff_ray.images import from_png

    return np.stack([from_png(base64.b64decode(im["png"])) for im in resp.json()["images"]])


def test_generate_returns_pngs_with_metadata(service):
    r = _post(service, {"n": 3, "seed": 5, "class": "7", "sampler": "ddim", "steps": 4})
    assert r.status_code == 200, r.text
    images = _images(r)
    assert images.shape == (3, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    meta = r.json()["images"][0]
    assert meta["sampler"] == "ddim" and meta["steps"] == 4 and meta["class"] == "7"
    assert meta["where"] == "edge" and meta["predicted_latency_s"] > 0
    assert {"flagged", "negated", "predicted_energy_j", "seed"} <= set(meta)
    # DDIM is deterministic: the same seed gives the same images, another seed others
    again = _images(_post(service, {"n": 3, "seed": 5, "class": "7", "sampler": "ddim", "steps": 4}))
    other = _images(_post(service, {"n": 3, "seed": 6, "class": "7", "sampler": "ddim", "steps": 4}))
    assert np.abs(again - images).max() < 2 / 255 and np.abs(other - images).max() > 0.1


def test_blatant_trigger_in_the_noise_is_flagged_and_negated_over_http(service):
    """The service's flag and negation path, end to end: a trigger no input test can miss
    (a +4 patch). The detectors' power on a real backdoor is benchmarks/serve.py's."""
    x = np.random.default_rng(3).standard_normal((4, 1, 16, 16)).astype("<f4")
    x[:, :, :6, :6] += 4.0
    noise = {"shape": list(x.shape), "data": base64.b64encode(x.tobytes()).decode()}
    r = _post(service, {"n": 4, "noise": noise, "sampler": "ddim", "steps": 4})
    assert r.status_code == 200, r.text
    flags = [im["flagged"] for im in r.json()["images"]]
    assert all(flags) and all(im["negated"] for im in r.json()["images"])
    clean = _post(service, {"n": 16, "seed": 11, "sampler": "ddim", "steps": 4}).json()["images"]
    assert sum(im["flagged"] for im in clean) <= 1


def test_health_and_model_card(service, tiny_run):
    h = requests.get(f"{service}/health", timeout=30).json()
    assert h["status"] == "ok"
    card = requests.get(f"{service}/model", timeout=30).json()
    assert card["run"] == "served" and card["conditional"] is True   # no host path
    assert str(tiny_run) not in json.dumps(card)
    # the served model was trained with no attack: its audit must not call it backdoored
    assert card["audit"]["verdict"] == "clean" and card["defense"] is True
    assert card["limits"]["max_n"] == 16 and len(card["classes"]) == 10
    assert {(p["sampler"], p["steps"]) for p in card["profile"]} == {
        (s, k) for s in ("ddim", "dpm") for k in (2, 4, 8)}


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"n": 17}, 422, "n = 17"),
    ({"n": 2, "class": "99"}, 422, "class = '99'"),
    ({"steps": -3}, 422, "steps = -3"),
    ({"steps": 10**9}, 422, "steps = 1000000000"),
    ({"sampler": "euler"}, 422, "sampler = 'euler'"),
    ({"n": 1, "colour": "red"}, 422, "unknown field colour"),
    ({"latency_s": 1.0}, 422, "device_class"),
    ({"latency_s": 1.0, "device_class": "phone", "steps": 4}, 422, "not both"),
    (b"x" * (10 << 20), 413, "limit"),
])
def test_bad_request_gets_4xx_and_service_keeps_serving(service, body, status, words):
    r = _post(service, body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert _post(service, {"n": 1, "steps": 2}).status_code == 200


def test_budgeted_request_is_planned_and_infeasible_names_nearest(service, tiny_run):
    from ssdiff_ray.service.generator import Generator

    body = {"n": 2, "latency_s": 60.0, "energy_j": 100.0, "min_quality": 0.5,
            "device_class": "phone"}
    r = _post(service, body)
    assert r.status_code == 200, r.text
    meta = r.json()["images"][0]
    assert meta["quality"] >= 0.5 and meta["predicted_latency_s"] <= 60.0
    assert meta["predicted_energy_j"] <= 100.0
    # the service answers with the planner's pick from the run's profile (the cheapest
    # feasible option in device energy); the latency budget is loose enough that the
    # replica's queue and observed latencies cannot change it
    gen = Generator(tiny_run)
    plan = gen.plan(gen.parse(json.dumps(body).encode()))
    assert (meta["sampler"], meta["steps"], meta["where"]) == (plan.sampler, plan.steps,
                                                                plan.where)
    assert meta["predicted_energy_j"] == pytest.approx(plan.energy_j)
    tight = {"n": 2, "latency_s": 1e-6, "energy_j": 1e-9, "min_quality": 0.9,
             "device_class": "mcu"}
    r = _post(service, tight)
    assert r.status_code == 422 and "nearest feasible" in r.json()["error"]
    near = r.json()["nearest"]
    # the nearest budget it names is one the service accepts (with 5% slack for the queue)
    ok = _post(service, {**tight, "latency_s": near["latency_s"] * 1.05,
                         "energy_j": near["energy_j"] * 1.05})
    assert ok.status_code == 200, ok.text


def test_concurrent_requests_are_batched(service):
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda s: _post(service, {"n": 1, "seed": s, "steps": 8}), range(8)))
    assert all(r.status_code == 200 for r in rs)
    assert max(r.json()["batch_requests"] for r in rs) > 1


def test_loadtest_reports_throughput_and_no_errors(service, tmp_path):
    from ssdiff_ray.service.loadtest import loadtest, save

    table = loadtest(service, [1, 4], 8, {"n": 1, "steps": 2})
    assert list(table["concurrency"]) == [1, 4] and (table["errors"] == 0).all()
    assert (table["ok"] == 8).all() and (table["requests_per_s"] > 0).all()
    assert (table["p50_s"] <= table["p99_s"]).all()
    files = save(table, tmp_path / "lt")
    assert all(p for p in files)


def test_hostile_requests_get_4xx_and_leave_the_service_serving(service):
    deep = _post(service, b"[" * 100_000)
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]
    # a chunked body (no Content-Length) over the limit: refused while it is read
    chunked = requests.post(f"{service}/generate", data=(b"x" * 65536 for _ in range(40)),
                            timeout=120)
    assert chunked.status_code == 413 and "limit" in chunked.json()["error"]
    long = _post(service, {"n": 1, "class": "7" * 100_000})
    assert long.status_code == 422 and len(long.content) < 1000   # not echoed back
    work = _post(service, {"n": 16, "sampler": "ddpm", "steps": 100})   # 1,600 > 1,000
    assert work.status_code == 422 and "image-steps" in work.json()["error"]
    assert _post(service, {"n": 1, "steps": 2}).status_code == 200


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=st.one_of(
    st.fixed_dictionaries({}, optional={k: JSON for k in ("n", "seed", "class", "sampler",
                                                          "steps", "guidance", "latency_s",
                                                          "energy_j", "min_quality",
                                                          "device_class", "noise")}),
    JSON, st.binary(max_size=64)))
def test_fuzzed_bodies_never_answer_5xx(service, body):
    """Property-based bodies over real HTTP (benchmarks/serve_fuzz.py sends 10,000): a 4xx
    with a JSON reason, or images; never a server error."""
    if isinstance(body, dict) and isinstance(body.get("n"), int) and body["n"] > 4:
        body["n"] = 4  # a valid request generates: keep the test's time bounded
    r = _post(service, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert r.status_code < 500, (body, r.text)
    assert r.status_code == 200 or "error" in r.json()


def _open(page, url):
    from playwright.sync_api import expect

    page.goto(f"{url}/")
    # locator waits, not wait_for_function: the page's CSP forbids evaluating strings
    expect(page.locator("#model")).not_to_have_text("loading the model card...", timeout=60_000)


def _wait_for_error(page):
    from playwright.sync_api import expect

    expect(page.locator("#error")).not_to_be_empty(timeout=120_000)


def test_page_generates_and_shows_images_with_costs_and_verdicts(service, page):
    _open(page, service)
    assert "parameters" in page.text_content("#model") and "audit: clean" in page.text_content("#model")
    assert page.is_visible("#class-field")  # a conditional model
    assert page.locator("#class option").count() == 11  # "any" + the 10 classes
    page.fill("#n", "3")
    page.select_option("#class", "7")
    page.select_option("#sampler", "ddim")
    page.fill("#steps", "2")
    page.click("#generate")
    page.wait_for_selector("#images figure", timeout=120_000)
    figures = page.locator("#images figure")
    assert figures.count() == 3
    sizes = page.eval_on_selector_all("#images img", "els => els.map(e => [e.naturalWidth, e.complete])")
    assert sizes == [[16, True]] * 3  # real 16 x 16 PNGs decoded by the browser
    caption = figures.first.text_content()
    assert "class 7" in caption and "ddim 2 steps" in caption
    assert "latency" in caption and "energy" in caption
    assert page.locator("#images .verdict").count() == 3  # --show-flags: the operator's view
    assert page.text_content("#error") == ""
    assert page.text_content("#status").startswith("3 images in")


def test_page_shows_the_apis_error_for_a_bad_value(service, page):
    _open(page, service)
    page.fill("#n", "17")  # over the service's max_n = 16
    page.click("#generate")
    _wait_for_error(page)
    api = _post(service, {"n": 17, "seed": 0})
    assert page.text_content("#error") == f"422: {api.json()['error']}"
    assert page.locator("#images figure").count() == 0


def test_page_files_come_from_the_service_alone(service):
    r = requests.get(f"{service}/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "http" not in r.text.replace("http-equiv", "")  # nothing loaded from elsewhere
    js = requests.get(f"{service}/page.js", timeout=30)
    assert js.status_code == 200 and "fetch(\"/generate\"" in js.text
    assert requests.post(f"{service}/", timeout=30).status_code == 405


def test_health_answers_at_once_while_the_defense_is_estimated(service, tiny_run, tmp_path):
    """A run whose defense is not cached yet (copied without RUN/defense): /health answers
    at once, 503 with the stage, /generate a 503 naming it, until the estimate is done;
    then the same deployment serves. (Redeploys on the module's port: the next test
    redeploys the module's run.)"""
    import shutil

    from ssdiff_ray.service import app

    run = tmp_path / "fresh"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("defense"))
    app.start(str(run), port=int(service.rsplit(":", 1)[1]), max_n=16, wait_s=0, ready_wait_s=0)
    h = requests.get(f"{service}/health", timeout=30)
    assert h.status_code == 503, h.text
    body = h.json()
    assert body["status"] == "starting" and body["stage"] and body["elapsed_s"] >= 0
    assert str(tmp_path) not in h.text  # the stage names the run, not its path
    g = _post(service, {"n": 1, "steps": 2})
    assert g.status_code == 503 and "not ready" in g.json()["error"]
    stages = [body["stage"]]
    app.wait_ready(service, 600, stages.append)
    assert any("estimating the trigger" in st for st in stages), stages
    assert _post(service, {"n": 1, "steps": 2}).status_code == 200
    assert (run / "defense" / "audit.json").is_file()


def test_api_keys_and_hidden_flags(service, tiny_run, tmp_path):
    """Redeployed with an API key and without the operator's flags (the last tests before
    the service stops)."""
    import hashlib

    from ssdiff_ray.service import app

    key = KEY
    app.start(tiny_run, port=int(service.rsplit(":", 1)[1]), max_n=16,
              api_key_sha256=(hashlib.sha256(key.encode()).hexdigest(),))
    assert requests.get(f"{service}/health", timeout=30).status_code == 200  # no key needed
    body = {"n": 2, "steps": 2}
    for headers in ({}, {"Authorization": "Bearer " + "x" * 24}, {"Authorization": key}):
        r = _post(service, body, headers=headers)
        assert r.status_code == 401 and "Bearer" in r.json()["error"]
    assert requests.get(f"{service}/model", timeout=30).status_code == 401
    r = _post(service, body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    assert all("flagged" not in im and "negated" not in im for im in r.json()["images"])


def test_page_asks_for_the_api_key_and_hides_the_flags(service, page):
    """On the keyed redeploy of the test before: the page asks for the key, a request
    without it shows the API's 401 message, with it images come without verdicts."""
    _open(page, service)
    assert page.is_visible("#key-field") and "API key" in page.text_content("#model")
    page.fill("#n", "2")
    page.fill("#steps", "2")
    page.click("#generate")
    _wait_for_error(page)
    assert page.text_content("#error").startswith("401: ") and "Bearer" in page.text_content("#error")
    page.fill("#api-key", KEY)
    page.click("#generate")
    page.wait_for_selector("#images figure", timeout=120_000)
    assert page.locator("#images figure").count() == 2
    assert page.locator("#images .verdict").count() == 0
    assert page.text_content("#error") == ""


def test_stop_releases_the_port_and_the_actors(service):
    """Last test on the module's service: it stops it."""
    import ray
    from ray import serve

    from ssdiff_ray.service import app

    assert requests.get(f"{service}/health", timeout=30).status_code == 200
    app.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{service}/health", timeout=5)
    _assert_nobody_listens(int(service.rsplit(":", 1)[1]))
    alive = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == serve._private.constants.SERVE_NAMESPACE]
    assert alive == []


def test_service_refuses_a_model_whose_cached_audit_says_backdoored(tiny_run, tmp_path, capsys):
    """The refusal reads the audit in the run's defense cache (computed for the served
    model); here its statistic is set by hand to a value the audit rule calls backdoored,
    and the cache signed again with this machine's secret."""
    import shutil

    from ssdiff_ray.cli import main
    from ssdiff_ray.defense.audit import AuditRule

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    audit = json.loads((run / "defense" / "audit.json").read_text())
    rule = AuditRule.load()  # the cached verdict is re-judged from the statistic
    value = rule.threshold - 1 if rule.below else rule.threshold + 1
    (run / "defense" / "audit.json").write_text(json.dumps({**audit, rule.statistic: value}))
    from ssdiff_ray.defense.cache import sign

    sign(run)  # the operator vouches for the edit (unsigned, it would be computed anew)
    # --for-s: were the refusal to fail, the service stops after 1 s instead of serving on
    assert main(["serve", str(run), "--port", str(_free_port()), "--for-s", "1"]) == 2
    from ray import serve

    serve.shutdown()  # the command joined this session's Ray and left its Serve (not ours) up
    refusal = [ln for ln in capsys.readouterr().err.splitlines() if "refusing to serve" in ln]
    assert len(refusal) == 1 and "backdoored" in refusal[0] and str(tmp_path) not in refusal[0]
    from ssdiff_ray.service.generator import Generator

    assert Generator(run, allow_backdoored=True).audit["verdict"] == "backdoored"



def test_defense_cache_is_reused_and_made_again_for_other_weights(tiny_run, tmp_path):
    import shutil

    import torch

    from ssdiff_ray.defense import cache
    from ssdiff_ray.defense.defense import Defense
    from ssdiff_ray.inference import load_run_model

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg, unet, scheduler = load_run_model(run)
    fresh = Defense.from_config(cfg, unet, scheduler)
    assert cache.load(run, fresh) is not None  # the service's startup saved it
    x = torch.randn((6, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    x[:3, :, :6, :6] += 4.0
    made = Defense.from_config(cfg, unet, scheduler).prepare()
    assert (fresh.detect(x)["flagged"] == made.detect(x)["flagged"]).all()
    assert np.allclose(fresh.est.tau, made.est.tau)
    with torch.no_grad():  # other weights: the cache no longer applies
        next(unet.parameters()).add_(0.01)
    unet.save_pretrained(run / "model" / "unet")
    assert cache.load(run, Defense.from_config(cfg, unet, scheduler)) is None


def test_serve_config_file_deploys_through_the_app_builder(tiny_run):
    """cluster/serve.yaml's application, as `serve deploy` builds it (run_dir swapped)."""
    from pathlib import Path

    import yaml
    from ray import serve

    from ssdiff_ray.service.app import build_app

    conf = yaml.safe_load((Path(__file__).parents[1] / "cluster" / "serve.yaml").read_text())
    args = {**conf["applications"][0]["args"], "run_dir": tiny_run, "max_replicas": 1}
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name="ssdiff", route_prefix="/")
        from ssdiff_ray.service.app import wait_ready

        wait_ready(f"http://127.0.0.1:{port}", 120)  # 503 until the replica's model is ready
        card = requests.get(f"http://127.0.0.1:{port}/model", timeout=60).json()
        assert card["limits"]["max_n"] == args["max_n"] and card["defense"] is True
    finally:
        serve.shutdown()
    with pytest.raises(ValueError, match="unknown option colour"):
        build_app({"run_dir": tiny_run, "colour": 1})


@pytest.mark.parametrize("argv, words", [
    (["serve", "/no/such/run"], "not a finished run directory"),
    (["serve-profile", "RUN", "--samplers", "euler"], "--samplers 'euler'"),
    (["loadtest", "http://127.0.0.1:9", "--concurrency", "0,8"], "--concurrency '0,8'"),
    (["loadtest", "127.0.0.1:8000"], "expected an http"),
])
def test_service_commands_bad_input_one_line(tiny_run, capsys, argv, words):
    from ssdiff_ray.cli import main

    argv = [tiny_run if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
