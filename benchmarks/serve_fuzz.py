"""Issue 44: 10,000 malformed or hostile requests over real HTTP against ``ssdiff serve``'s
application on an embedded local Ray, with a well-formed request every 100.

Bodies come from a seeded generator: objects of the API's fields with values of any JSON
type, any JSON value, raw bytes (tests/test_serve.py draws the same kinds with Hypothesis).
Then fixed hostile ones: a 100,000-deep array, a chunked body over the limit, a 100 kB
string, n x steps over the cap, no API key and a wrong one. Counts the answers by status
and the 5xx (target 0), checks that every well-formed request succeeded, and reports its
p95 latency and the replica's and proxy's RSS at the start and the end (target: within 10%).

    python benchmarks/serve_fuzz.py RUN [--requests 10000]

Writes ``benchmarks/results/serve_fuzz.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
import requests  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from provenance import args_config, write_json  # noqa: E402
from serve import _rss_mib  # noqa: E402

KEY = "fuzz-key-" + "0" * 16
FIELDS = ("n", "seed", "class", "sampler", "steps", "guidance", "latency_s", "energy_j",
          "min_quality", "device_class", "noise")


def _value(rnd, depth: int = 0):
    """A random JSON value: scalars of every type, nested lists and objects."""
    kind = rnd.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rnd.random() < 0.5
    if kind == 2:
        return rnd.choice([0, 1, -1, 2**63, -(2**70), rnd.randrange(-100, 100)])
    if kind == 3:
        return rnd.choice([0.5, -1e308, 1e-300, float("nan"), float("inf"), rnd.uniform(-10, 10)])
    if kind == 4:
        return "".join(rnd.choice("ab7_ \u00e9\u2603\"{[") for _ in range(rnd.randrange(12)))
    if kind in (5, 6):
        return [_value(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    return {_value(rnd, 3) if rnd.random() < 0.3 else rnd.choice(FIELDS): _value(rnd, depth + 1)
            for _ in range(rnd.randrange(4))}


def bodies(count: int, seed: int) -> list:
    """``count`` bodies, reproducible from ``seed``: objects of the API's fields with values
    of any JSON type (half), any JSON value, raw bytes."""
    import random

    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        r = rnd.random()
        if r < 0.5:
            out.append({f: _value(rnd) for f in rnd.sample(FIELDS, rnd.randrange(1, 5))})
        elif r < 0.8:
            out.append(_value(rnd))
        else:
            out.append(bytes(rnd.randrange(256) for _ in range(rnd.randrange(64))))
    return out


def hostile(url: str) -> list[tuple[str, requests.Response]]:
    post = lambda data, **kw: requests.post(f"{url}/generate", data=data, timeout=120, **kw)  # noqa: E731
    auth = {"Authorization": f"Bearer {KEY}"}
    return [
        ("deep", post(b"[" * 100_000, headers=auth)),
        ("chunked_over_limit", post((b"x" * 65536 for _ in range(40)), headers=auth)),
        ("long_string", post(json.dumps({"class": "7" * 100_000}), headers=auth)),
        ("work_cap", post(json.dumps({"n": 64, "sampler": "ddpm", "steps": 1000}), headers=auth)),
        ("no_key", post(json.dumps({"n": 1}))),
        ("wrong_key", post(json.dumps({"n": 1}), headers={"Authorization": "Bearer nope"})),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=5.0, help="latency budget of a good request")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_fuzz.json"))
    a = ap.parse_args(argv)
    from ssdiff_ray.driver.session import ray_session
    from ssdiff_ray.service import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ray_session():
        url = app.start(a.run, port=port, max_batch_size=8, api_key_sha256=(
            hashlib.sha256(KEY.encode()).hexdigest(),))
        auth = {"Authorization": f"Bearer {KEY}"}
        good = {"n": 1, "sampler": "ddim", "steps": 10}
        requests.post(f"{url}/generate", json=good, headers=auth, timeout=120)  # warm
        rss0 = _rss_mib()
        statuses, five, good_s, good_bad = Counter(), [], [], 0
        t0 = time.perf_counter()
        for i, body in enumerate(bodies(a.requests, a.seed)):
            if isinstance(body, dict) and isinstance(body.get("n"), int) and body["n"] > 4:
                body["n"] = 4  # a valid request generates: keep the run's time bounded
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = requests.post(f"{url}/generate", data=data, headers=auth, timeout=120)
            statuses[r.status_code] += 1
            if r.status_code >= 500:
                five.append({"body": data[:200].decode("latin-1"), "answer": r.text[:200]})
            if i % 100 == 0:
                t = time.perf_counter()
                g = requests.post(f"{url}/generate", json=good, headers=auth, timeout=120)
                good_s.append(time.perf_counter() - t)
                good_bad += g.status_code != 200
        wall = time.perf_counter() - t0
        fixed = {name: r.status_code for name, r in hostile(url)}
        rss1 = _rss_mib()
        app.stop()
    growth = {k: rss1.get(k, 0) / v - 1 for k, v in rss0.items() if v}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    good_s.sort()
    res = {"commit": commit, "command": f"python benchmarks/serve_fuzz.py RUN --requests {a.requests}",
           "requests": a.requests, "wall_s": wall, "statuses": dict(statuses),
           "server_errors": len(five), "server_error_examples": five[:10],
           "hostile": fixed, "good_requests": len(good_s), "good_failed": good_bad,
           "good_p95_s": good_s[int(0.95 * (len(good_s) - 1))] if good_s else None,
           "good_budget_s": a.budget_s, "rss_start_mib": rss0, "rss_end_mib": rss1,
           "rss_growth": growth}
    write_json(a.out, res, args_config(a))
    print(json.dumps({k: v for k, v in res.items() if k != "server_error_examples"}, indent=1))
    return 0 if not five and not good_bad else 1


if __name__ == "__main__":
    sys.exit(main())
