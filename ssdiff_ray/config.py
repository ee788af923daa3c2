"""One typed, validated run configuration: TOML file + ``section.key=value`` overrides.

(Over 400 lines on purpose: the whole schema in one file, section by section, so a user
reads every option with its range and its doc in one place.)

Every field has a type and an allowed range in its metadata; ``from_dict`` checks them all
and raises ``ConfigError`` with one line naming the field, the value and what is allowed.

The options of an aggregation rule or a bit policy are not here: each rule declares them in
an ``Options`` dataclass in its own file (``ssdiff_ray/options.py``), and every registered
rule's options are keys of its section (``RULE_SECTIONS``), kept in ``section.options``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssdiff_ray.aggregation import AGGREGATORS
from ssdiff_ray.attacks import ATTACKS, CORRECTIONS, TARGETS, TRIGGERS
from ssdiff_ray.attacks.patterns import PatternFileError, is_pattern_file, read_pattern_file
from ssdiff_ray.codec import SUPPORTED_BITS as BITS
from ssdiff_ray.data import SOURCES, parse_classes
from ssdiff_ray.defense import ESTIMATORS, NEGATIONS
from ssdiff_ray.devices import DEVICE_CLASSES
from ssdiff_ray.errors import UserError
from ssdiff_ray.faults import parse_fault
from ssdiff_ray.model import BETA_SCHEDULES, PRESETS, SAMPLERS
from ssdiff_ray.options import option as _f
from ssdiff_ray.policies import POLICIES
from ssdiff_ray.registry import load as load_registered


class ConfigError(UserError):
    """A config value a user can fix; the message is one line."""


# tracking URI schemes MLflow's client opens (mysql+pymysql: and the like count as mysql:)
MLFLOW_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")

# A section's rule and the registry of its choices: the keys of the section are its own
# fields plus the fields of every registered rule's ``Options`` (in ``section.options``).
RULE_SECTIONS = {"server": ("aggregator", AGGREGATORS), "quant": ("policy", POLICIES)}


def _rule_options(section: str):
    """The ``options`` field of a rule section, every registered rule's defaults: not a key
    users set (see RULE_SECTIONS)."""
    return field(default_factory=lambda: {k: default for k, (_, _, default, _)
                                          in rule_options(section).items()},
                 metadata={"rule_options": True})


@dataclass
class DataConfig:
    name: str = _f("digits", choices=tuple(SOURCES),
                   doc="data source: digits, colour_digits (built in), parquet, image_folder")
    path: str = _f("", doc="the data set's file or folder, for sources that read one")
    image_column: str = _f("image")
    label_column: str = _f("label")
    label_type: str = _f("auto", choices=("auto", "int", "name"),
                         doc="labels are integers, class names, or whichever the column holds")
    image_size: int = _f(16, lo=8, hi=256)
    channels: int = _f(0, choices=(0, 1, 3), doc="image channels; 0 = read from the data set")
    num_classes: int = _f(0, lo=0, hi=100_000, doc="classes; 0 = read from the labels")
    alpha: float = _f(0.5, lo=0.0, lo_open=True, hi=1e6, doc="Dirichlet concentration (small = non-IID)")
    min_samples: int = _f(8, lo=1, hi=100000, doc="fewest samples any client holds")
    classes: str = _f("", doc="keep only these labels, relabelled 0..K-1: '5-9' or '1,3,7' "
                      "('' = all); e.g. pretrain on 0-4, fine-tune on 5-9")
    holdout: float = _f(0.0, lo=0.0, hi=0.5, doc="share of each class kept from the clients "
                        "(RUN/holdout.parquet): real test data the model never saw, for "
                        "ssdiff distill-eval")


@dataclass
class ClientsConfig:
    count: int = _f(100, lo=1, hi=1_000_000)
    per_round: float = _f(0.04, lo=0.0, lo_open=True, hi=1.0, doc="fraction selected each round")
    pools: int = _f(0, lo=0, hi=10_000, doc="ClientPool actors; 0 = one per CPU (or GPU)")
    state_cache_mib: float = _f(256.0, lo=0.0, hi=1e7, doc="per pool: error-feedback residuals "
                                "kept in RAM; the rest spill to disk (clients.state_dir)")
    state_dtype: str = _f("float32", choices=("float32", "float16"),
                          doc="precision residuals are held at, in RAM, on disk and in checkpoints")
    state_dir: str = _f("", doc="where pools spill residuals ('' = the system's temp dir)")


@dataclass
class ModelConfig:
    preset: str = _f("small", choices=tuple(PRESETS))
    conditional: bool = _f(False, doc="class-conditional UNet (classifier-free guidance)")
    timesteps: int = _f(1000, lo=10, hi=4000)
    beta_schedule: str = _f("linear", choices=BETA_SCHEDULES)
    pretrained: str = _f("", doc="start from a saved diffusers pipeline or UNet: a local "
                         "directory or a hub id ('' = a fresh model of model.preset)")


@dataclass
class TrainConfig:
    local_steps: int = _f(30, lo=1, hi=100_000)
    batch_size: int = _f(32, lo=1, hi=65536)
    lr: float = _f(3e-3, lo=0.0, lo_open=True, hi=10.0)
    lr_schedule: str = _f("cosine", choices=("constant", "cosine"),
                          doc="client lr over rounds: constant, or cosine from lr to lr_final")
    lr_final: float = _f(2e-4, lo=0.0, hi=10.0, doc="client lr at the last round (cosine)")
    warmup_steps: int = _f(32, lo=0, hi=100_000,
                           doc="local steps over which each client's lr rises linearly to the "
                           "round's lr (its Adam starts fresh; 0 = none)")
    grad_clip: float = _f(1.0, lo=0.0, hi=1e6, doc="0 = no clipping")
    scale_work_by_device: bool = _f(True, doc="local steps scale with the device class")
    label_dropout: float = _f(0.1, lo=0.0, hi=1.0,
                              doc="conditional: share of labels dropped to 'no class' (for guidance)")
    mode: str = _f("full", choices=("full", "lora"),
                   doc="train every weight, or low-rank adapters only (needs model.pretrained)")


@dataclass
class LoraConfig:
    rank: int = _f(8, lo=1, hi=4096)
    alpha: float = _f(8.0, lo=0.0, lo_open=True, hi=1e6, doc="scaling = alpha / rank")
    dropout: float = _f(0.0, lo=0.0, hi=0.99)
    target_modules: str = _f("to_q,to_k,to_v,to_out.0",
                             doc="comma-separated module names (suffixes) that get adapters: "
                             "attention projections; add conv1,conv2,time_emb_proj for convs")
    aggregation: str = _f("exact", choices=("naive", "ffa", "exact"),
                          doc="naive: mean of A and of B (FedIT); ffa: A frozen, mean of B "
                          "(FFA-LoRA); exact: mean of B_i A_i, residual into the base (FedEx-LoRA)")
    rank_by_class: dict = _f({}, doc="device class -> the smaller rank its clients train and "
                             "upload, e.g. { mcu = 2, phone = 4 } (others: lora.rank)")


@dataclass
class QuantConfig:
    policy: str = _f("fixed", choices=POLICIES)
    bits: int = _f(32, choices=BITS, doc="fixed bits; start bits for adaptive policies")
    min_bits: int = _f(2, choices=BITS)
    max_bits: int = _f(8, choices=BITS)
    block_size: int = _f(256, lo=8, hi=1 << 20)
    error_feedback: bool = _f(True)
    downlink_bits: int = _f(32, choices=BITS, doc="bits of the broadcast global model")
    options: dict = _rule_options("quant")  # the policies' options (policies/<name>.py, Options)


@dataclass
class ServerConfig:
    aggregator: str = _f("fedavg", choices=AGGREGATORS,
                         doc="aggregation rule (norm_bound, multi_krum, flame screen updates)")
    lr: float = _f(1.0, lo=0.0, lo_open=True, hi=100.0, doc="server learning rate")
    ema_decay: float = _f(0.7, lo=0.0, hi=0.9999,
                          doc="EMA of the global weights over rounds, used to sample and saved (0 = off)")
    round_timeout_s: float = _f(600.0, lo=0.0, lo_open=True, hi=1e9)
    checkpoint_every: int = _f(0, lo=0, hi=1_000_000, doc="rounds between checkpoints (0 = end)")
    max_update_norm: float = _f(0.0, lo=0.0, hi=1e12, doc="clip client updates to this L2 norm")
    options: dict = _rule_options("server")  # the aggregation rules' (aggregation/<name>.py, Options)


@dataclass
class DevicesConfig:
    profiles: str = _f("", doc="user profile table (Parquet/CSV); empty = seeded population")
    class_mix: dict = _f({}, doc="device class -> weight; empty = default mix")
    deadline_s: float = _f(math.inf, lo=0.0, lo_open=True, doc="round deadline (simulated)")
    bandwidth_hz: float = _f(20e6, lo=1.0, hi=1e12)
    noise_dbm_per_hz: float = _f(-174.0, lo=-300.0, hi=0.0)
    downlink_rate_bps: float = _f(50e6, lo=1.0, hi=1e13)
    cell_m: float = _f(500.0, lo=1.0, hi=1e6)
    tx_power_cap_w: float = _f(math.inf, lo=0.0, lo_open=True, doc="cap on every device's tx power")
    cpu_scale: float = _f(1.0, lo=0.0, lo_open=True, hi=1.0, doc="fraction of max CPU frequency")


@dataclass
class EvalConfig:
    every: int = _f(0, lo=0, hi=1_000_000, doc="rounds between evaluations (0 = last round only)")
    samples: int = _f(500, lo=10, hi=1_000_000)
    sampler: str = _f("ddim", choices=SAMPLERS, doc="DPM-Solver++, DDIM or DDPM")
    steps: int = _f(50, lo=1, hi=4000, doc="sampling steps (DDPM: a strided grid, 1000 = every timestep)")
    guidance: float = _f(2.0, lo=0.0, hi=100.0,
                         doc="conditional: classifier-free guidance scale (1 = none, 0 = unconditional)")
    inception_weights: str = _f("", doc="Inception-v3 weights file for FID/KID in the field's "
                                "feature space; '' = the run's own classifier")
    baseline: bool = _f(True, doc="also measure the untrained model (FID ceiling)")
    grid: int = _f(64, lo=0, hi=1024, doc="samples in the PNG grid")


@dataclass
class RayConfig:
    address: str = _f("", doc="'' = embedded local Ray; 'auto' or HOST:PORT joins a cluster")
    num_cpus_per_pool: float = _f(1.0, lo=0.0, hi=1024.0)
    num_gpus_per_pool: float = _f(0.0, lo=0.0, hi=64.0)
    torch_threads: int = _f(1, lo=1, hi=1024, doc="torch threads per pool actor")
    max_restarts: int = _f(3, lo=-1, hi=1000, doc="pool actor restarts (-1 = unlimited)")
    keep_pools_s: float = _f(15.0, lo=0.0, hi=86400.0, doc="seconds a finished run's pools "
                             "wait, holding their CPUs, for this process's next run (0 = never)")
    batched_clients: str = _f("auto", choices=("auto", "on", "off"), doc="vmap clients (GPU)")
    server_resource: str = _f("", doc="custom Ray resource that pins the parameter server to a "
                              "node (e.g. 'ps'); '' = the driver's node")
    pool_resources: dict = _f({}, doc="custom Ray resources every pool asks for, e.g. "
                              "{ aiot_jetson = 1 } to place pools on Jetson nodes")


@dataclass
class AttackConfig:
    kind: str = _f("none", choices=("none", *ATTACKS))
    trigger: str = _f("", doc="a trigger of the attack kind ('' = the kind's first), or a "
                      ".png (alpha = mask) / .npy ((C + 1) x S x S: pattern, mask) file")
    target: str = _f("hat", doc="hat, cross, corner, class:K, or a .png / .npy image file")
    malicious_fraction: float = _f(0.1, lo=0.0, hi=1.0)
    poison_rate: float = _f(0.1, lo=0.0, hi=1.0, doc="fraction of each poisoned batch")
    scale: float = _f(1.0, lo=0.0, lo_open=True, hi=1e6, doc="model replacement factor")
    gamma: float = _f(0.6, lo=0.0, lo_open=True, hi=10.0, doc="TrojDiff trigger noise scale")
    sampler: str = _f("ddim", choices=CORRECTIONS,
                      doc="BadDiffusion: the sampler the backdoor is tuned to (VillanDiffusion's "
                      "correction: ddim, ancestral ddpm, probability-flow ode, or both)")
    eval_samples: int = _f(200, lo=10, hi=1_000_000, doc="triggered samples per evaluation")


@dataclass
class DefenseConfig:
    enabled: bool = _f(True, doc="detect and negate triggered inputs when evaluating")
    fpr: float = _f(0.01, lo=0.0, lo_open=True, hi=0.5, doc="detector false-positive target")
    estimate_trigger: bool = _f(True, doc="invert the trigger from the model (slower)")
    estimator: str = _f("probe", choices=tuple(ESTIMATORS),
                        doc="trigger estimation: probe the backdoor's decision region, "
                        "or scan patches")
    estimate_gen_steps: int = _f(8, lo=1, hi=1000,
                                 doc="DDIM steps of each short generation the trigger estimator "
                                 "runs (its cost scales with them; fewer is coarser)")
    negation: str = _f("redraw", choices=NEGATIONS,
                       doc="flagged inputs: redrawn from N(0, I), or the estimated trigger "
                       "subtracted first (TERD; keeps the caller's noise)")
    target_check: bool = _f(True, doc="also flag inputs whose generation lands on the "
                            "estimated target (one more generation per input)")


@dataclass
class FaultsConfig:
    inject: dict = _f({}, doc="client id -> fault injected in that client: nan, inf, wrong_bits, "
                      "truncate, oversize or slow:SECONDS (reliability tests, chaos runs)")


@dataclass
class LogConfig:
    tensorboard: bool = _f(False, doc="write round scalars and sample grids for TensorBoard "
                           "(tensorboard --logdir RUN/tb)")
    tensorboard_dir: str = _f("", doc="TensorBoard log folder ('' = RUN/tb)")
    mlflow_uri: str = _f("", doc="MLflow tracking URI: sqlite:///mlflow.db, file:./mlruns, "
                         "http://HOST:5000 ('' = off)")
    mlflow_experiment: str = _f("ssdiff", doc="MLflow experiment the run is logged under")
    mlflow_parent_run: str = _f("", doc="MLflow run id this run nests under (ssdiff tune "
                                "sets it to the study's run)")


@dataclass
class Config:
    seed: int = _f(0, lo=0, hi=2**31 - 1)
    rounds: int = _f(24, lo=1, hi=1_000_000)
    out_dir: str = _f("runs")
    name: str = _f("", doc="run directory name; empty = timestamp")
    data: DataConfig = field(default_factory=DataConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        """Nested dicts, as the TOML file holds them: rule options are keys of their section."""
        d = dataclasses.asdict(self)
        for name in RULE_SECTIONS:
            d[name].update(d[name].pop("options"))
        return d


def _sections() -> dict[str, type]:
    return {
        f.name: f.default_factory
        for f in dataclasses.fields(Config)
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)
    }


def _type_name(t) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a table"}[t]


def _coerce(path: str, value: Any, typ: type) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"{path} = {value!r}: must be true or false")
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{path} = {value!r}: must be an integer")
    if not isinstance(value, typ):
        raise ConfigError(f"{path} = {value!r}: must be {_type_name(typ)}")
    return value


def _check_range(path: str, value: Any, meta: dict) -> None:
    choices, lo, hi = meta.get("choices"), meta.get("lo"), meta.get("hi")
    if choices is not None and value not in choices:
        allowed = ", ".join(repr(c) if isinstance(c, str) else str(c) for c in choices)
        raise ConfigError(f"{path} = {value!r}: must be one of {allowed}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{path} = nan: must be a number")
        bad_lo = lo is not None and (value <= lo if meta.get("lo_open") else value < lo)
        bad_hi = hi is not None and value > hi
        if bad_lo or bad_hi:
            lo_s = "-inf" if lo is None else f"{lo:g}"
            hi_s = "inf" if hi is None else f"{hi:g}"
            br = "(" if meta.get("lo_open") else "["
            raise ConfigError(f"{path} = {value!r}: must be in {br}{lo_s}, {hi_s}]")


def _field_types(cls) -> dict[str, tuple[type, dict]]:
    hints = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}
    return {f.name: (hints.get(f.type, f.type), dict(f.metadata)) for f in dataclasses.fields(cls)
            if not f.metadata.get("rule_options")}


def rule_options(section: str) -> dict[str, tuple[type, dict, Any, list[str]]]:
    """The option keys of a rule section: key -> (type, metadata, default, rules taking it),
    read from each registered rule's ``Options`` (none for other sections)."""
    if section not in RULE_SECTIONS:
        return {}
    out: dict[str, tuple[type, dict, Any, list[str]]] = {}
    for name, path in RULE_SECTIONS[section][1].items():
        opts = getattr(load_registered(path), "Options", None)
        if opts is None:
            continue
        defaults = opts()
        for key, (typ, meta) in _field_types(opts).items():
            if key in out and (out[key][0], out[key][2]) != (typ, getattr(defaults, key)):
                raise TypeError(f"{section}.{key}: {name} and {out[key][3][0]} declare it "
                                "with different types or defaults")
            owners = out[key][3] if key in out else []
            out[key] = (typ, meta, getattr(defaults, key), [*owners, name])
    return out


def schema() -> dict[str, tuple[type, dict]]:
    """Every key a config takes, as ``"section.key" -> (type, metadata)`` (rule options
    included; tables, e.g. ``devices.class_mix``, have type dict)."""
    sections = _sections()
    out = {k: v for k, v in _field_types(Config).items() if k not in sections}
    for sec, cls in sections.items():
        out.update({f"{sec}.{k}": v for k, v in _field_types(cls).items()})
        out.update({f"{sec}.{k}": (typ, meta) for k, (typ, meta, _, _) in rule_options(sec).items()})
    return out


def check_value(path: str, value: Any, typ: type, meta: dict) -> Any:
    """``value`` as ``typ`` within ``meta``'s range, else one ConfigError naming ``path``."""
    value = _coerce(path, value, typ)
    _check_range(path, value, meta)
    return value


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested dicts (unknown keys are errors)."""
    sections = _sections()
    top = {k: v for k, v in _field_types(Config).items() if k not in sections}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{key} = {value!r}: must be a table [{key}]")
            kwargs[key] = _section(key, sections[key], value)
        elif key in top:
            typ, meta = top[key]
            value = _coerce(key, value, typ)
            _check_range(key, value, meta)
            kwargs[key] = value
        else:
            known = ", ".join(sorted([*top, *sections]))
            raise ConfigError(f"unknown config key {key!r} (known: {known})")
    cfg = Config(**kwargs)
    _check_cross(cfg)
    return cfg


def _section(name: str, cls, raw: dict) -> Any:
    types, rules = _field_types(cls), rule_options(name)
    kwargs: dict[str, Any] = {}
    options = cls().options if name in RULE_SECTIONS else {}
    for key, value in raw.items():
        path = f"{name}.{key}"
        if key in types:
            kwargs[key] = check_value(path, value, *types[key])
        elif key in rules:
            options[key] = check_value(path, value, *rules[key][:2])
        else:
            known = ", ".join([*types, *rules])
            raise ConfigError(f"unknown config key {path!r} (known in [{name}]: {known})")
    if name in RULE_SECTIONS:
        kwargs["options"] = options
    return cls(**kwargs)


def check_attack_files(cfg: Config) -> None:
    """A trigger or target file must load, fit ``data.image_size`` (and ``data.channels``
    once known) and have a mask; else one ConfigError naming the field."""
    a, d = cfg.attack, cfg.data
    for key in ("trigger", "target"):
        value = getattr(a, key)
        if a.kind != "none" and is_pattern_file(value):
            try:
                read_pattern_file(value, d.image_size, d.channels or None)
            except PatternFileError as e:
                raise ConfigError(f"attack.{key} = {e}") from None


def _check_cross(cfg: Config) -> None:
    """Constraints between fields."""
    q = cfg.quant
    if q.min_bits > q.max_bits:
        raise ConfigError(f"quant.min_bits = {q.min_bits}: must be <= quant.max_bits ({q.max_bits})")
    needs_path = SOURCES[cfg.data.name][1]
    if needs_path and not cfg.data.path:
        raise ConfigError(f"data.path = '': must name {needs_path} when data.name = "
                          f"{cfg.data.name!r}")
    for k, w in cfg.devices.class_mix.items():
        if k not in DEVICE_CLASSES:
            raise ConfigError(f"devices.class_mix.{k}: unknown device class (known: "
                              f"{', '.join(DEVICE_CLASSES)})")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ConfigError(f"devices.class_mix.{k} = {w!r}: must be a number >= 0")
    check_attack_files(cfg)
    a = cfg.attack
    if a.trigger and not is_pattern_file(a.trigger) and a.trigger not in TRIGGERS:
        raise ConfigError(f"attack.trigger = {a.trigger!r}: choose from {', '.join(TRIGGERS)} "
                          "or a .png / .npy file")
    if a.kind != "none":
        triggers = ATTACKS[a.kind][1]
        if a.trigger and not is_pattern_file(a.trigger) and a.trigger not in triggers:
            raise ConfigError(f"attack.trigger = {a.trigger!r}: {a.kind} takes {', '.join(triggers)}"
                              " or a .png / .npy file")
        ok = (a.target in TARGETS or is_pattern_file(a.target)
              or (a.target.startswith("class:") and a.target[6:].isdigit()))
        if not ok:
            raise ConfigError(f"attack.target = {a.target!r}: must be {', '.join(TARGETS)}, "
                              "class:K or a .png / .npy file")
    for k, v in cfg.ray.pool_resources.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1e6:
            raise ConfigError(f"ray.pool_resources.{k} = {v!r}: must be a number in (0, 1e6]")
        if k in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ConfigError(f"ray.pool_resources.{k}: built-in resource, use ray.num_cpus_per_pool"
                              " / ray.num_gpus_per_pool")
    for k, v in cfg.faults.inject.items():
        if not str(k).isdigit() or int(k) >= cfg.clients.count:
            raise ConfigError(f"faults.inject.{k}: not a client id (0..{cfg.clients.count - 1})")
        try:
            parse_fault(v)
        except ValueError as e:
            raise ConfigError(f"faults.inject.{k} = {e}") from None
    if cfg.devices.class_mix and sum(cfg.devices.class_mix.values()) <= 0:
        raise ConfigError("devices.class_mix: weights must not all be 0")
    _check_lora(cfg)
    uri = cfg.log.mlflow_uri
    if uri and uri.partition(":")[0].partition("+")[0] not in MLFLOW_SCHEMES:
        raise ConfigError(f"log.mlflow_uri = {uri[:80]!r}: must start with "
                          f"{', '.join(s + ':' for s in MLFLOW_SCHEMES)} (a folder is file:PATH)")
    if msg := load_registered(AGGREGATORS[cfg.server.aggregator]).check_config(cfg.server):
        raise ConfigError(msg)
    if cfg.data.classes:
        try:
            parse_classes(cfg.data.classes)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _check_lora(cfg: Config) -> None:
    if cfg.train.mode != "lora":
        return
    if not cfg.model.pretrained:
        raise ConfigError("train.mode = 'lora': needs model.pretrained (adapters train on a "
                          "pretrained model; `ssdiff pretrain` makes one)")
    if cfg.quant.downlink_bits != 32:
        raise ConfigError(f"quant.downlink_bits = {cfg.quant.downlink_bits}: must be 32 with "
                          "train.mode = 'lora' (the adapter broadcast is not quantized)")
    if cfg.ray.batched_clients == "on":
        raise ConfigError("ray.batched_clients = 'on': not with train.mode = 'lora'")
    for k, r in cfg.lora.rank_by_class.items():
        if k not in DEVICE_CLASSES:
            raise ConfigError(f"lora.rank_by_class.{k}: unknown device class (known: "
                              f"{', '.join(DEVICE_CLASSES)})")
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= cfg.lora.rank:
            raise ConfigError(f"lora.rank_by_class.{k} = {r!r}: must be an integer in "
                              f"[1, lora.rank = {cfg.lora.rank}]")
    if not lora_targets(cfg.lora.target_modules):
        raise ConfigError(f"lora.target_modules = {cfg.lora.target_modules!r}: names no module")


def lora_targets(text: str) -> list[str]:
    """``lora.target_modules`` as a list of names."""
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value); the value is read as TOML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word is a string: --set quant.policy=fixed
    return key.split("."), value


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p}: no such file")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {p}: not valid TOML ({e})") from None


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML file (optional), apply ``section.key=value`` overrides, validate."""
    raw: dict[str, Any] = read_toml(path, "config file") if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {k} is not a section")
        if _is_string_field(keys) and not isinstance(value, str):
            value = text.partition("=")[2].strip()  # --set name=nan is the name "nan"
        node[keys[-1]] = value
    return from_dict(raw)


def _is_string_field(keys: list[str]) -> bool:
    return schema().get(".".join(keys), (None,))[0] is str


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v)} to TOML")


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML that ``load`` reads back to an equal Config."""
    d = cfg.to_dict()
    sections = _sections()
    lines = [f"{k} = {toml_value(v)}" for k, v in d.items() if k not in sections]
    for name in sections:
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in d[name].items()]
    return "\n".join(lines) + "\n"


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_toml(cfg))
