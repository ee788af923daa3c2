"""The Ray Serve application: one ``GenerationService`` deployment (HTTP ingress) whose
replicas each hold a ``ssdiff_ray.service.Generator``.

    GET  /          -> a page to try the service (page.html + page.js: no build, no CDN)
    GET  /health    -> {"status": "ok", ...}; until the model is ready a 503
                       {"status": "starting" | "failed", "stage", "stage_s", "elapsed_s"}
    GET  /model     -> what is served, its audit verdict, limits and profile
    POST /generate  -> {"images": [{"png": base64, "flagged", "negated", "sampler", "steps",
                                    "where", "predicted_latency_s", "predicted_energy_j", ...}]}

Concurrent ``/generate`` requests meet in ``@serve.batch`` and are generated as one batch
(``max_batch_size`` 1 turns batching off). ``build_app`` is the application builder that
``serve deploy cluster/serve.yaml`` imports.

Hostile clients: the body is read in chunks up to the limit (a chunked body without a
Content-Length too), every malformed request is a 4xx with a JSON reason, a request's work
is capped (``Limits``), a request that waits longer than ``request_timeout_s`` answers 503,
``api_key_sha256`` (the SHA-256 of accepted keys) makes ``/model`` and ``/generate`` ask for
``Authorization: Bearer KEY``, and the per-image defense verdicts (``flagged``,
``negated``: a free trigger detector for an attacker) are returned only with
``show_flags``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import threading
import time
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

DEFAULTS = {"defend": True, "allow_backdoored": False, "max_batch_size": 32,
            "batch_wait_timeout_s": 0.05, "max_n": 64, "max_image_steps": 64 * 50,
            "torch_threads": 0, "request_timeout_s": 120.0, "api_key_sha256": (),
            "show_flags": False, "ready_wait_s": 30.0}


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


# The page may load nothing but itself: its script from here, images from data: URLs.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; "
                "connect-src 'self'; img-src data:; style-src 'unsafe-inline'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
PAGE_FILES = {"/": ("page.html", "text/html; charset=utf-8"),
              "/page.js": ("page.js", "text/javascript; charset=utf-8")}


def _page_files() -> dict[str, tuple[bytes, str]]:
    from importlib.resources import files

    here = files("ssdiff_ray.service")
    return {path: (here.joinpath(name).read_bytes(), kind)
            for path, (name, kind) in PAGE_FILES.items()}


@serve.deployment(max_ongoing_requests=128)
class GenerationService:
    def __init__(self, run_dir: str, options: dict):
        o = DEFAULTS | options
        self.options, self.run_dir, self.run_name = o, run_dir, Path(run_dir).name
        self.timeout_s = float(o["request_timeout_s"])
        self.key_digests = tuple(o["api_key_sha256"])
        self.show_flags = bool(o["show_flags"])
        self.generate_batch.set_max_batch_size(o["max_batch_size"])
        self.generate_batch.set_batch_wait_timeout_s(o["batch_wait_timeout_s"])
        self.queued_images = 0
        self.served = 0
        self.page = _page_files()
        # The model, its defense and a warm-up are prepared in a thread, so /health answers
        # at once (503 with the stage until ready): a model whose trigger estimate is not
        # cached yet takes minutes on a CPU. A cached one is ready within ready_wait_s, so
        # a replica Serve adds later (autoscaling) takes traffic only once it is ready.
        self.gen, self.failure = None, ""
        self.t0 = time.monotonic()
        self._stage("loading the model")
        ready = threading.Event()
        threading.Thread(target=self._prepare, args=(ready,), daemon=True,
                         name="prepare-model").start()
        ready.wait(float(o["ready_wait_s"]))

    def _stage(self, text: str) -> None:
        self.stage, self.stage_t0 = text.replace(self.run_dir, self.run_name), time.monotonic()

    def _prepare(self, ready: threading.Event) -> None:
        try:
            import torch

            from ssdiff_ray.service.generator import Generator
            from ssdiff_ray.service.request import Limits

            o = self.options
            torch.set_num_threads(o["torch_threads"] or max(1, int(os.environ.get("OMP_NUM_THREADS", 1))))
            gen = Generator(self.run_dir, defend=o["defend"], allow_backdoored=o["allow_backdoored"],
                            limits=Limits(max_n=o["max_n"], max_image_steps=o["max_image_steps"]),
                            device="cuda" if torch.cuda.is_available() else "cpu", log=self._stage)
            self._stage("warming up")
            gen.warm_up(min(8, o["max_batch_size"]))
            self.gen = gen
        except Exception as e:  # noqa: BLE001 - reported by /health; the replica stays up
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.failure = first.replace(self.run_dir, self.run_name)
        finally:
            ready.set()

    def _not_ready(self) -> JSONResponse:
        """503 while the model is prepared (or when it could not be): stage and seconds."""
        now = time.monotonic()
        body = {"status": "failed" if self.failure else "starting", "stage": self.stage,
                "stage_s": round(now - self.stage_t0, 1), "elapsed_s": round(now - self.t0, 1)}
        if self.failure:
            body["error"] = self.failure
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    async def __call__(self, request: Request):
        path, method = request.url.path.rstrip("/") or "/", request.method
        if path in self.page and method == "GET":
            body, kind = self.page[path]
            return Response(body, media_type=kind, headers=PAGE_HEADERS)
        if path == "/health" and method == "GET":
            if self.gen is None:
                return self._not_ready()
            return {"status": "ok", "served_requests": self.served,
                    "queued_images": self.queued_images, "pid": os.getpid()}
        if path in ("/model", "/generate") and not self._authorized(request):
            return JSONResponse({"error": f"{path}: needs Authorization: Bearer <API key>"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if path in ("/model", "/generate") and self.gen is None:
            if self.failure:
                return _error(503, f"the model cannot be served: {self.failure}")
            return _error(503, f"the model is not ready yet: {self.stage} "
                          f"({time.monotonic() - self.stage_t0:.0f} s); try again", stage=self.stage)
        if path == "/model" and method == "GET":
            return self.gen.model_card()
        if path == "/generate" and method == "POST":
            return await self.generate(request)
        if path in ("/health", "/model", "/generate", *self.page):
            return _error(405, f"{method} {path}: method not allowed")
        return _error(404, f"{path[:60]}: not found (GET /, GET /health, GET /model, "
                      "POST /generate)")

    def _authorized(self, request: Request) -> bool:
        if not self.key_digests:
            return True
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(key.strip().encode()).hexdigest()
        return scheme.lower() == "bearer" and any(hmac.compare_digest(digest, d)
                                                  for d in self.key_digests)

    async def _body(self, request: Request) -> bytes | None:
        """The body, read in chunks: None once it passes the limit (a chunked body has no
        Content-Length to refuse it by)."""
        limit = self.gen.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:  # refused before it is read
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def generate(self, request: Request):
        from ssdiff_ray.service.offload import Infeasible
        from ssdiff_ray.service.request import RequestError

        t0 = time.perf_counter()
        body = await self._body(request)
        if body is None:
            return _error(413, f"body over the limit of {self.gen.limits.max_body_bytes:,} bytes")
        try:
            req = self.gen.parse(body)
            plan = self.gen.plan(req, self.queued_images)
        except RequestError as e:
            return _error(e.status, str(e))
        except Infeasible as e:
            return _error(422, str(e), nearest=e.nearest)
        self.queued_images += req.n
        try:
            result = await asyncio.wait_for(self.generate_batch((req, plan)), self.timeout_s)
        except TimeoutError:
            return _error(503, f"not generated within {self.timeout_s:g} s (busy): try again")
        finally:
            self.queued_images -= req.n
        self.gen.latency.record(plan.server_s, time.perf_counter() - t0)
        self.served += 1
        if not self.show_flags:
            result = {**result, "images": [{k: v for k, v in im.items()
                                            if k not in ("flagged", "negated")}
                                           for im in result["images"]]}
        return JSONResponse({**result, "server_extra_s": self.gen.latency.value()})

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)  # both set from options
    async def generate_batch(self, items: list) -> list[dict]:
        # in a thread: the event loop keeps taking requests into the next batch meanwhile
        return await asyncio.to_thread(self.gen.generate, items)


def deployment_options(replicas: int = 1, max_replicas: int = 0, num_cpus: float = 1.0,
                       gpu_fraction: float | None = None) -> dict:
    """Replicas (fixed, or autoscaled from ``replicas`` to ``max_replicas``), CPUs each, and
    a fraction of a GPU each when the cluster has GPUs (``gpu_fraction`` None: 0.25 then)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    frac = (0.25 if gpus else 0.0) if gpu_fraction is None else gpu_fraction
    opts: dict = {"ray_actor_options": {"num_cpus": num_cpus, "num_gpus": frac}}
    if max_replicas > replicas:
        opts["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": max_replicas,
                                      "target_ongoing_requests": 16}
    else:
        opts["num_replicas"] = replicas
    return opts


def build_app(args: dict):
    """Application builder (``serve deploy``/``serve run ssdiff_ray.service.app:build_app run_dir=...``):
    ``run_dir`` and any of ``DEFAULTS``, plus ``replicas``, ``max_replicas``, ``num_cpus``."""
    if "run_dir" not in args:
        raise ValueError("build_app: args need run_dir (the run directory to serve)")
    args = dict(args)
    run_dir = str(args.pop("run_dir"))
    dep = {k: args.pop(k) for k in ("replicas", "max_replicas", "num_cpus", "gpu_fraction")
           if k in args}
    for k in ("max_batch_size", "max_n", "max_image_steps", "torch_threads", "replicas",
              "max_replicas"):
        if k in args:
            args[k] = int(args[k])
    if isinstance(args.get("api_key_sha256"), str):  # "d1,d2" from a YAML string
        args["api_key_sha256"] = tuple(d for d in args["api_key_sha256"].split(",") if d)
    for k in ("defend", "allow_backdoored", "show_flags"):
        if isinstance(args.get(k), str):
            args[k] = args[k].lower() in ("1", "true", "yes")
    unknown = sorted(set(args) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"build_app: unknown option {', '.join(unknown)} (known: run_dir, "
                         f"replicas, max_replicas, num_cpus, gpu_fraction, {', '.join(DEFAULTS)})")
    opts = deployment_options(int(dep.get("replicas", 1)), int(dep.get("max_replicas", 0)),
                              float(dep.get("num_cpus", 1.0)),
                              None if "gpu_fraction" not in dep else float(dep["gpu_fraction"]))
    return GenerationService.options(**opts).bind(run_dir, args)


def start(run_dir: str, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
          max_replicas: int = 0, num_cpus: float = 1.0, gpu_fraction: float | None = None,
          wait_s: float | None = 600.0, on_stage=None, **options) -> str:
    """Deploy the service on the running Ray (``ray_session`` first); returns its URL once
    the model is ready (``wait_ready``; ``wait_s`` 0: at once, None: however long)."""
    from ssdiff_ray.driver import warm

    warm.release_pools()  # a finished run's kept pools would hold the CPUs replicas need
    serve.start(http_options={"host": host, "port": port})
    opts = deployment_options(replicas, max_replicas, num_cpus, gpu_fraction)
    serve.run(GenerationService.options(**opts).bind(str(run_dir), options), name="ssdiff",
              route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    if wait_s != 0:
        wait_ready(url, wait_s, on_stage)
    return url


def wait_ready(url: str, timeout_s: float | None = 600.0, on_stage=None) -> None:
    """Poll ``GET /health`` until the model is ready; ``on_stage(text)`` at each new stage.
    A model the replica cannot serve (a backdoored audit, a broken run) is one UserError."""
    import json
    import urllib.error
    import urllib.request

    from ssdiff_ray.errors import UserError

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    seen = None
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10):
                return  # 200: ready
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}") if e.code == 503 else {}
            if body.get("status") == "failed":
                raise UserError(body.get("error", "the model cannot be served")) from None
            if on_stage and body.get("stage") not in (None, seen):
                seen = body["stage"]
                on_stage(seen)
        except (urllib.error.URLError, OSError, ValueError):
            pass  # the proxy is still starting
        if deadline is not None and time.monotonic() > deadline:
            raise UserError(f"{url}: the model was not ready within {timeout_s:g} s "
                            f"(last stage: {seen or 'none reported'})")
        time.sleep(0.5)


def delete() -> None:
    """Remove this application, leaving Serve (and anything else it serves) running."""
    serve.delete("ssdiff")


def stop() -> None:
    """Delete the application and shut Serve down (its proxy frees the port)."""
    serve.shutdown()
