"""A ``POST /generate`` body, parsed and checked before anything runs.

Every problem is one ``RequestError`` with an HTTP status and a message that names the
field: 400 for a body that is not a JSON object, 413 for one over the size limit, 422 for
a value out of range. The body::

    {"n": 4, "seed": 7, "class": "3",                 # class only for a conditional model
     "sampler": "dpm", "steps": 10,                   # explicit, or a budget:
     "latency_s": 2.0, "energy_j": 5.0, "min_quality": 0.8, "device_class": "phone",
     "guidance": 2.0,
     "noise": {"shape": [4, 1, 16, 16], "data": "<base64 float32>"}}  # optional x_T
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field

import numpy as np

from ssdiff_ray.devices import DEVICE_CLASSES
from ssdiff_ray.errors import UserError
from ssdiff_ray.model import SAMPLERS

FIELDS = ("n", "seed", "class", "sampler", "steps", "guidance", "latency_s", "energy_j",
          "min_quality", "device_class", "noise")


class RequestError(UserError):
    """A request the service refuses: ``status`` (4xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_n: int = 64                  # images per request
    max_steps: int = 1000            # sampling steps
    max_image_steps: int = 64 * 50   # n x steps: the work one request may ask for
    max_body_bytes: int = 1 << 20    # 1 MiB: a 64 x 3 x 32 x 32 float32 noise is 0.8 MiB base64


def _r(v) -> str:
    """A client's value in an error message, cut short: a message never echoes a megabyte."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class ModelInfo:
    """What a request is checked against: the served model's shape and classes."""

    channels: int
    image_size: int
    conditional: bool
    class_names: tuple[str, ...]
    timesteps: int
    sampler: str          # defaults for a request that names neither steps nor a budget
    steps: int
    guidance: float


@dataclass
class GenerateRequest:
    n: int = 1
    seed: int = 0
    label: int | None = None
    sampler: str | None = None
    steps: int | None = None
    guidance: float = 1.0
    latency_s: float | None = None
    energy_j: float | None = None
    min_quality: float | None = None
    device_class: str | None = None
    noise: np.ndarray | None = field(default=None, repr=False)

    @property
    def budgeted(self) -> bool:
        return any(v is not None for v in (self.latency_s, self.energy_j, self.min_quality))


def _int(body: dict, key: str, default: int, lo: int, hi: int, what: str = "") -> int:
    v = body.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(422, f"{key} = {_r(v)}: expected an integer")
    if not lo <= v <= hi:
        raise RequestError(422, f"{key} = {v}: expected {lo} to {hi}{what}")
    return v


def _positive(body: dict, key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise RequestError(422, f"{key} = {_r(v)}: expected a positive number")
    return float(v)


def _label(body: dict, info: ModelInfo) -> int | None:
    if "class" not in body:
        return None
    v = body["class"]
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise RequestError(422, f"class = {_r(v)}: expected a class name or index")
    name = str(v)
    if not info.conditional:
        raise RequestError(422, f"class = {_r(name)}: the served model is not class-conditional")
    if name in info.class_names:
        return info.class_names.index(name)
    if name.isdigit() and len(name) < 10 and int(name) < len(info.class_names):
        return int(name)
    raise RequestError(422, f"class = {_r(name)}: not a class of the served model "
                            f"({', '.join(info.class_names)})")


def _noise(body: dict, n: int, info: ModelInfo) -> np.ndarray | None:
    v = body.get("noise")
    if v is None:
        return None
    shape = [n, info.channels, info.image_size, info.image_size]
    if not isinstance(v, dict) or v.get("shape") != shape or not isinstance(v.get("data"), str):
        raise RequestError(422, f"noise: expected {{\"shape\": {shape}, \"data\": base64 "
                                "little-endian float32}")
    try:
        raw = base64.b64decode(v["data"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "noise.data: not base64") from None
    if len(raw) != 4 * math.prod(shape):
        raise RequestError(422, f"noise.data: {len(raw)} bytes, expected {4 * math.prod(shape)} "
                                f"for shape {shape}")
    x = np.frombuffer(raw, dtype="<f4").reshape(shape)
    if not np.isfinite(x).all():
        raise RequestError(422, "noise.data: contains NaN or inf")
    return x.copy()


def parse_generate(body: bytes, info: ModelInfo, limits: Limits = Limits()) -> GenerateRequest:
    """The checked request, or a ``RequestError`` naming the first thing wrong."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"body of {len(body):,} bytes: the limit is "
                                f"{limits.max_body_bytes:,}")
    try:
        obj = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"malformed JSON: {str(e)[:120]}") from None
    except RecursionError:  # "[" * 100000: the decoder's stack, not a server error
        raise RequestError(400, "malformed JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise RequestError(400, f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        names = ", ".join(u.encode("unicode_escape").decode() for u in unknown)  # one line
        names = names if len(names) <= 60 else names[:57] + "..."
        raise RequestError(422, f"unknown field {names} (known: {', '.join(FIELDS)})")
    n = _int(obj, "n", 1, 1, limits.max_n, " images per request")
    req = GenerateRequest(n=n, seed=_int(obj, "seed", 0, 0, 2**63 - 1), label=_label(obj, info),
                          latency_s=_positive(obj, "latency_s"),
                          energy_j=_positive(obj, "energy_j"), noise=_noise(obj, n, info))
    g = obj.get("guidance", info.guidance)
    if isinstance(g, bool) or not isinstance(g, int | float) or not 0 <= g <= 20:
        raise RequestError(422, f"guidance = {_r(g)}: expected a number from 0 to 20")
    req.guidance = float(g)
    q = obj.get("min_quality")
    if q is not None and (isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q <= 1):
        raise RequestError(422, f"min_quality = {_r(q)}: expected a number in (0, 1] "
                                "(1 = as good as the best profiled setting)")
    req.min_quality = None if q is None else float(q)
    _steps_or_budget(obj, req, info, limits)
    return req


def _steps_or_budget(obj: dict, req: GenerateRequest, info: ModelInfo, limits: Limits) -> None:
    explicit = "sampler" in obj or "steps" in obj
    if explicit and req.budgeted:
        raise RequestError(422, "give either sampler/steps or a budget (latency_s, energy_j, "
                                "min_quality), not both")
    if req.budgeted:
        dc = obj.get("device_class")
        if not isinstance(dc, str) or dc not in DEVICE_CLASSES:
            raise RequestError(422, f"device_class = {_r(dc)}: a budgeted request names the "
                                    f"device's class ({', '.join(DEVICE_CLASSES)})")
        req.device_class = dc
        return
    if "device_class" in obj:
        dc = obj["device_class"]
        if not isinstance(dc, str) or dc not in DEVICE_CLASSES:
            raise RequestError(422, f"device_class = {_r(dc)}: expected one of "
                                    f"{', '.join(DEVICE_CLASSES)}")
        req.device_class = dc
    sampler = obj.get("sampler", info.sampler)
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise RequestError(422, f"sampler = {_r(sampler)}: expected one of {', '.join(SAMPLERS)}")
    hi = min(limits.max_steps, info.timesteps)
    req.sampler, req.steps = sampler, _int(obj, "steps", min(info.steps, hi), 1, hi)
    if req.n * req.steps > limits.max_image_steps:
        raise RequestError(422, f"n x steps = {req.n} x {req.steps}: over the {limits.max_image_steps:,} "
                                "image-steps one request may ask for (fewer images or steps)")
