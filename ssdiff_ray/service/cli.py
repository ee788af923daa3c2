"""``ssdiff serve``, ``ssdiff serve-profile`` and ``ssdiff loadtest`` (argparse here; Ray,
Serve and torch load when a command runs)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ssdiff_ray.errors import UserError
from ssdiff_ray.model import SAMPLERS


def _check_run(run_dir: str) -> Path:
    p = Path(run_dir)
    if not (p / "model" / "model_index.json").is_file() or not (p / "config.toml").is_file():
        raise UserError(f"{run_dir}: not a finished run directory (no model/ or config.toml)")
    return p


def cmd_serve(args) -> int:
    from ssdiff_ray.driver.session import ray_session

    run_dir = _check_run(args.run_dir)
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: expected 1 to 65535")
    keys = _api_keys(args.api_key_file) if args.api_key_file else ()
    # Our embedded Ray: shutting it down (ray_session) stops Serve, its proxy and replicas.
    with ray_session(args.address) as started:
        from ssdiff_ray.service import app

        try:
            url = app.start(str(run_dir.resolve()), host=args.host, port=args.port,
                            replicas=args.replicas, max_replicas=args.max_replicas,
                            num_cpus=args.num_cpus, gpu_fraction=args.gpu_fraction,
                            defend=args.defense, allow_backdoored=args.allow_backdoored,
                            max_batch_size=args.max_batch_size, max_n=args.max_n,
                            max_image_steps=args.max_image_steps,
                            batch_wait_timeout_s=args.batch_wait_s,
                            request_timeout_s=args.request_timeout_s, api_key_sha256=keys,
                            show_flags=args.show_flags, wait_s=0)
            # /health answers at once: 503 with the stage (the defense's trigger estimate,
            # minutes on a CPU the first time) until the model is ready. A model the audit
            # calls backdoored is refused there, in one line (exit 2).
            print(f"serving {run_dir} at {url}: preparing the model", file=sys.stderr, flush=True)
            app.wait_ready(url, None, lambda stage: print(f"  {stage}", file=sys.stderr, flush=True))
            print(f"serving {run_dir} at {url} (audit: {_verdict(run_dir)}; defense "
                  f"{'on' if args.defense else 'off'}; batching up to {args.max_batch_size}); "
                  "Ctrl-C stops", flush=True)
            if args.for_s:
                time.sleep(args.for_s)
            else:
                while True:
                    time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            if not started:  # a cluster's Serve may host other applications: remove only ours
                app.delete()
    print("stopped", file=sys.stderr)
    return 0


def _verdict(run_dir: Path) -> str:
    """The audit verdict the replica prepared (RUN/defense/audit.json, under today's rule)."""
    from ssdiff_ray.defense.cache import rejudge

    try:
        return (rejudge(json.loads((run_dir / "defense" / "audit.json").read_text())) or {}
                ).get("verdict", "unknown")
    except (OSError, ValueError):
        return "unknown"


def _api_keys(path: str) -> tuple[str, ...]:
    """The SHA-256 of each key in ``path`` (one a line): the service never holds the keys."""
    import hashlib

    p = Path(path)
    try:
        keys = [k.strip() for k in p.read_text().splitlines() if k.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--api-key-file {path}: not readable ({e.__class__.__name__})") from None
    short = [k for k in keys if len(k) < 16]
    if not keys or short:
        raise UserError(f"--api-key-file {path}: expected one key of 16 or more characters a "
                        "line")
    return tuple(hashlib.sha256(k.encode()).hexdigest() for k in keys)


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise UserError(f"{flag} {text!r}: expected positive integers like 1,8,32")
    return vals


def cmd_profile(args) -> int:
    from ssdiff_ray.service.profile import profile_run

    run_dir = _check_run(args.run_dir)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    bad = [s for s in samplers if s not in SAMPLERS]
    if bad or not samplers:
        raise UserError(f"--samplers {args.samplers!r}: expected some of {', '.join(SAMPLERS)}")
    steps = _ints(args.steps, "--steps")
    if args.n < 2:
        raise UserError(f"--n {args.n}: FID needs at least 2 samples")
    profile_run(run_dir, samplers, steps, n=args.n, batch=args.batch, defended=args.defense)
    print((run_dir / "serve_profile.md").read_text())
    print(f"saved: {run_dir / 'serve_profile.parquet'}")
    return 0


def cmd_loadtest(args) -> int:
    from ssdiff_ray.service.loadtest import loadtest, save

    levels = _ints(args.concurrency, "--concurrency")
    if args.requests < 1:
        raise UserError(f"--requests {args.requests}: expected at least 1")
    if not args.url.startswith(("http://", "https://")):
        raise UserError(f"{args.url}: expected an http:// or https:// URL")
    try:
        body = json.loads(args.body)
    except ValueError as e:
        raise UserError(f"--body: not JSON ({e})") from None
    table = loadtest(args.url, levels, args.requests, body, timeout_s=args.timeout_s)
    cols = ["concurrency", "requests", "ok", "errors", "requests_per_s", "p50_s", "p95_s", "p99_s"]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if table["ok"].sum() == 0:
        print(f"no request succeeded: {table['statuses'].iloc[0]}", file=sys.stderr)
    print("files: " + ", ".join(save(table, args.out)))
    return 0 if table["errors"].sum() == 0 else 1


def add_parsers(sub) -> None:
    s = sub.add_parser("serve", help="serve a run's model over HTTP on Ray Serve, defended")
    s.add_argument("run_dir")
    s.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else embedded local Ray)")
    s.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--replicas", type=int, default=1, help="replicas (the minimum when autoscaling)")
    s.add_argument("--max-replicas", type=int, default=0,
                   help="autoscale up to this many replicas (default: a fixed count)")
    s.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    s.add_argument("--gpu-fraction", type=float, default=None,
                   help="GPU share per replica (default: 0.25 when the cluster has GPUs)")
    s.add_argument("--max-batch-size", type=int, default=32,
                   help="requests merged into one batch (1: no batching)")
    s.add_argument("--batch-wait-s", type=float, default=0.05,
                   help="how long a batch waits for more requests (10 ms split concurrent "
                        "requests into batches of 1-7 behind the HTTP proxy on 2 cores)")
    s.add_argument("--max-n", type=int, default=64, help="images per request at most")
    s.add_argument("--max-image-steps", type=int, default=64 * 50,
                   help="images x sampling steps one request may ask for at most")
    s.add_argument("--request-timeout-s", type=float, default=120.0,
                   help="a request not generated by then answers 503")
    s.add_argument("--api-key-file", help="accepted API keys, one a line: /model and "
                   "/generate then need 'Authorization: Bearer KEY' (default: no keys)")
    s.add_argument("--show-flags", action="store_true",
                   help="operator only: return each image's defense verdict (flagged, "
                   "negated), which hands a client a free trigger detector")
    s.add_argument("--defense", action=argparse.BooleanOptionalAction, default=True,
                   help="input tests and negation on every request (default: on)")
    s.add_argument("--allow-backdoored", action="store_true",
                   help="serve a model whose audit says backdoored (with the defense)")
    s.add_argument("--for-s", type=float, default=0, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)

    p = sub.add_parser("serve-profile", help="FID and server time against sampler and steps, "
                       "saved with the run for the service's planner")
    p.add_argument("run_dir")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--steps", default="5,10,20,50")
    p.add_argument("--n", type=int, default=500, help="samples per FID")
    p.add_argument("--batch", type=int, default=32, help="batch size of the timed batch")
    p.add_argument("--defense", action=argparse.BooleanOptionalAction, default=True,
                   help="time the defended path (default; --no-defense: the sampler alone)")
    p.set_defaults(func=cmd_profile)

    lt = sub.add_parser("loadtest", help="HTTP load on a running service: requests/s, latency")
    lt.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    lt.add_argument("--concurrency", default="1,8,32")
    lt.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    lt.add_argument("--body", default='{"n": 1}', help="the JSON body of every request")
    lt.add_argument("--timeout-s", type=float, default=120.0)
    lt.add_argument("--out", default="loadtest", help="files OUT.parquet and OUT.json")
    lt.set_defaults(func=cmd_loadtest)

