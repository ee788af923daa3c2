"""The driver of ``ssdiff tune``: an Optuna study whose trials are whole federated runs.

Ask/tell on the driver, P trials at once as Ray tasks (``tuning.trial``). The study lives
in the storage, so the same command resumes it: trials left RUNNING by a dead driver are
marked FAIL and their parameters enqueued again, until N trials have finished.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssdiff_ray import config as config_mod
from ssdiff_ray.config import Config, ConfigError
from ssdiff_ray.errors import redact
from tuning.choices import OBJECTIVES, PRUNER_CHOICES, PRUNERS, SAMPLERS, one_of
from tuning.confirm import CONFIRM_SEED
from tuning.recovery import HEARTBEAT, KEPT, OWNER, owner_of_this_process, recover_interrupted
from tuning.space import Space, load_space, overrides
from tuning.storage import absolute_url, open_storage


@dataclass
class TuneOptions:
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    space: str | None = None
    trials: int = 20
    parallel: int = 1
    storage: str | None = None          # default sqlite:///OUT/study.db
    study: str = "ssdiff"
    out: str | None = None              # default <base out_dir>/tune-<study>
    objectives: list[str] = field(default_factory=lambda: ["energy", "fid"])
    constraints: list[str] = field(default_factory=list)   # "fid<=200"
    sampler: str = "tpe"                # a name in tuning.choices.SAMPLERS
    pruner: str = "auto"                # one of tuning.choices.PRUNER_CHOICES
    pruner_startup: int = 2
    startup_trials: int | None = None   # sampler's random start (default: trials // 3)
    seed: int | None = None             # sampler seed (default: the base config's seed)
    reference: list[str] = field(default_factory=list)  # KEY=VALUE: one trial enqueued first
    address: str | None = None
    stale_after_s: float = 300.0
    heartbeat_s: float = 30.0
    max_failures: int = 5               # consecutive failed trials before giving up
    confirm_seeds: int = 3              # fresh seeds the reference and the front run again on


def parse_constraint(text: str, objectives_ok=OBJECTIVES) -> tuple[str, str, float]:
    m = re.fullmatch(r"\s*(\w+)\s*(<=|>=)\s*([-+0-9.eE]+|inf)\s*", text)
    if not m or m.group(1) not in objectives_ok:
        raise ConfigError(f"--constraint {text!r}: expected METRIC<=VALUE or METRIC>=VALUE with "
                          f"METRIC one of {', '.join(objectives_ok)}")
    try:
        bound = float(m.group(3))
    except ValueError:
        raise ConfigError(f"--constraint {text!r}: {m.group(3)!r} is not a number") from None
    return m.group(1), m.group(2), bound


@dataclass
class StudySetup:
    opts: TuneOptions
    base: Config
    space: Space
    out: Path
    storage_url: str
    constraints: list[tuple[str, str, float]]
    reference: dict[str, Any] | None
    pruner: str
    mlflow_parent_run: str = ""         # the study's MLflow run, that trials nest under


def setup_study(opts: TuneOptions) -> StudySetup:
    """Validate everything a user gave before any storage, Ray or trial starts."""
    base = config_mod.load(opts.config, opts.overrides)
    space = load_space(opts.space)
    if opts.trials < 1:
        raise ConfigError(f"--trials {opts.trials}: must be >= 1")
    if opts.parallel < 1:
        raise ConfigError(f"--parallel {opts.parallel}: must be >= 1")
    if opts.confirm_seeds < 0:
        raise ConfigError(f"--confirm-seeds {opts.confirm_seeds}: must be >= 0")
    if not opts.objectives or len(set(opts.objectives)) != len(opts.objectives):
        raise ConfigError(f"--objectives {','.join(opts.objectives)}: give distinct objectives")
    for o in opts.objectives:
        if o not in OBJECTIVES:
            raise ConfigError(f"--objectives: unknown objective {o!r} (known: {', '.join(OBJECTIVES)})")
        if o.startswith("asr") and base.attack.kind == "none":
            raise ConfigError(f"--objectives {o}: needs an attack (attack.kind != 'none')")
        if o == "asr_defended" and not base.defense.enabled:
            raise ConfigError("--objectives asr_defended: needs defense.enabled = true")
    if opts.sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {opts.sampler!r}: must be {one_of(SAMPLERS)}")
    if opts.pruner not in PRUNER_CHOICES:
        raise ConfigError(f"--pruner {opts.pruner!r}: must be {one_of(PRUNER_CHOICES)}")
    pruner = opts.pruner
    if len(opts.objectives) > 1:
        if pruner not in ("auto", "none"):
            raise ConfigError(f"--pruner {pruner}: pruning needs a single objective "
                              f"(--objectives {opts.objectives[0]})")
        pruner = "none"
    elif pruner == "auto":
        pruner = "median"
    constraints = [parse_constraint(c) for c in opts.constraints]
    for name, _, _ in constraints:
        if name.startswith("asr") and base.attack.kind == "none":
            raise ConfigError(f"--constraint {name}: needs an attack (attack.kind != 'none')")
    out = Path(opts.out or Path(base.out_dir) / f"tune-{opts.study}").resolve()
    url = absolute_url(opts.storage or f"sqlite:///{out / 'study.db'}")
    reference = None
    if opts.reference:
        # The reference is the base config itself with a few fields changed (e.g. fixed
        # 8-bit): every searched field takes the base's value unless given here.
        given = [".".join(config_mod.parse_override(t)[0]) for t in opts.reference]
        ref_cfg = config_mod.load(opts.config, [*opts.overrides, *opts.reference]).to_dict()
        reference = {}
        for p in space.params:
            node: Any = ref_cfg
            for k in p.name.split("."):
                node = node[k]
            if p.kind == "categorical" and not p.contains(node):
                raise ConfigError(f"--reference: {p.name} = {node!r} is not among the search "
                                  f"space's choices {list(p.choices)}")
            reference[p.name] = node
        for k in given:
            if k not in reference:
                raise ConfigError(f"--reference {k}: not a searched field of the space")
    return StudySetup(opts, base, space, out, url, constraints, reference, pruner)


def trial_config(setup: StudySetup, params: dict, number: int, cpus: float, gpus: float,
                 seed: int | None = None) -> Config:
    """Base config + trial parameters (validated as ``--set`` overrides) + trial resources;
    ``seed``: a confirmation run's fresh seed (its run is ``c<number>``, not ``t<number>``).

    Pools are fixed per trial (``clients.pools``; one per ``cpus / P`` if the base leaves it
    to Ray) and each asks for ``cpus / (P * pools)`` CPUs at most, so the pools of P
    concurrent trials fit in the cluster together and none waits for another's CPU.
    """
    o = setup.opts
    name = f"t{number:04d}" if seed is None else f"c{number:04d}"
    sets = [*o.overrides, *overrides(params), f"out_dir={json.dumps(str(setup.out / 'trials'))}",
            f"name=\"{name}\"", *([] if seed is None else [f"seed={seed}"])]
    if setup.mlflow_parent_run:
        sets.append(f"log.mlflow_parent_run={json.dumps(setup.mlflow_parent_run)}")
    cfg = config_mod.load(o.config, sets)
    pools = cfg.clients.pools or max(1, int(cpus // o.parallel))
    pools = min(pools, cfg.clients.count)
    cpp = min(cfg.ray.num_cpus_per_pool, cpus / (o.parallel * pools))
    # keep_pools_s=0: a trial's idle pools would hold CPUs the next (concurrent) trial needs.
    res = [f"clients.pools={pools}", f"ray.num_cpus_per_pool={cpp!r}", "ray.keep_pools_s=0"]
    if cfg.ray.num_gpus_per_pool > 0 and gpus > 0:
        res.append(f"ray.num_gpus_per_pool={min(cfg.ray.num_gpus_per_pool, gpus / (o.parallel * pools))!r}")
    return config_mod.load(o.config, [*sets, *res])


def _waiting(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def make_sampler(setup: StudySetup):
    o = setup.opts
    seed = setup.base.seed if o.seed is None else o.seed
    startup = o.startup_trials if o.startup_trials is not None else max(2, o.trials // 3)
    return SAMPLERS[o.sampler](startup, seed)


def open_study(setup: StudySetup, storage):
    import optuna

    o = setup.opts
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage, study_name=o.study, sampler=make_sampler(setup),
        pruner=PRUNERS[setup.pruner](setup.base.rounds, o.pruner_startup),
        directions=["minimize"] * len(o.objectives), load_if_exists=True)
    names = study.metric_names
    if names is None:
        study.set_metric_names(list(o.objectives))
    elif list(names) != list(o.objectives):
        raise ConfigError(f"--study {o.study}: exists with objectives {','.join(names)}, "
                          f"not {','.join(o.objectives)} (use another --study name)")
    return study


def _values(setup: StudySetup, summary: dict) -> list[float]:
    return [float(summary.get(OBJECTIVES[o][0], math.nan) if summary.get(OBJECTIVES[o][0])
                  is not None else math.nan) for o in setup.opts.objectives]


def best_text(study, objectives: list[str]) -> str:
    """A short description of the current best (or Pareto front) for the progress bar."""
    from tuning.export import knee

    try:
        front = study.best_trials
    except Exception:  # noqa: BLE001 - no complete trial yet
        return ""
    if not front:
        return ""
    t = knee(front) if len(objectives) > 1 else front[0]
    vals = " ".join(f"{o}={v:.4g}" for o, v in zip(objectives, t.values))
    return (f"front={len(front)} " if len(objectives) > 1 else "") + f"#{t.number} {vals}"


def run_study(opts: TuneOptions, progress: bool = True, log=print) -> dict:
    """Run (or resume) the study until ``opts.trials`` trials have finished; export results."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        # Optuna's experimental/deprecation notes, and the out-of-range note for a reference
        # trial that keeps the base's value (e.g. deadline inf), are noise to a user here.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="Fixed parameter")
        warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator")
        warnings.filterwarnings("ignore", message="invalid value encountered")
        return _run_study(opts, progress, log)


def _run_study(opts: TuneOptions, progress: bool, log) -> dict:
    from ssdiff_ray.driver.session import ray_session
    from tuning.export import export

    setup = setup_study(opts)
    setup.out.mkdir(parents=True, exist_ok=True)
    storage = open_storage(setup.storage_url)
    study = open_study(setup, storage)
    recovered = recover_interrupted(study, storage, opts.stale_after_s)
    if recovered:
        log(f"resumed: trials {', '.join(map(str, recovered))} were interrupted; retrying them")
    _enqueue_reference(study, setup)
    if setup.base.log.mlflow_uri:
        setup.mlflow_parent_run = _mlflow_study_run(setup, log)
    confirm = None
    with ray_session(opts.address):
        loop = _StudyLoop(opts, setup, study)
        try:
            loop.run(progress)
        except BaseException:
            loop.requeue_running()
            raise
        if opts.confirm_seeds:
            confirm = _confirm(opts, setup, study, storage, progress, log)
    result = export(study, setup)
    if confirm is not None:
        result["confirmed"] = confirm
    if setup.mlflow_parent_run:
        from ssdiff_ray.tracking.mlflow_run import end_run

        end_run(setup.base.log.mlflow_uri, setup.mlflow_parent_run)
    result.update(study=opts.study, storage=redact(setup.storage_url), out=str(setup.out))  # no password
    return result


def _confirm(opts: TuneOptions, setup: StudySetup, study, storage, progress: bool, log) -> dict:
    """Run the reference and the front again on fresh seeds (``tuning.confirm``); write the
    report. A resumed study runs only the confirmation runs not yet done."""
    from tuning import confirm
    from tuning.report import write_report

    cstudy = confirm.open_confirm_study(setup, storage)
    recovered = recover_interrupted(cstudy, storage, opts.stale_after_s)
    if recovered:
        log(f"resumed: confirmation runs {', '.join(map(str, recovered))} were interrupted; "
            "retrying them")
    confirm.enqueue(cstudy, setup, study)
    loop = _StudyLoop(opts, setup, cstudy, confirming=True)
    try:
        loop.run(progress)
    except BaseException:
        loop.requeue_running()
        raise
    summary = confirm.summarize(study, cstudy, opts.objectives)
    return {**summary, **write_report(study, summary, setup, setup.out)}


def _mlflow_study_run(setup: StudySetup, log) -> str:
    """The study's MLflow run (found again on --resume), or '' if MLflow cannot be reached:
    trials then log as top-level runs, or warn and log nothing, as a plain run would."""
    from ssdiff_ray.tracking import warn
    from ssdiff_ray.tracking.mlflow_run import study_run

    try:
        return study_run(setup.base.log.mlflow_uri, setup.base.log.mlflow_experiment,
                         setup.opts.study, setup.storage_url)
    except Exception as e:  # noqa: BLE001 - logging must never stop the study
        warn(f"MLflow: no study run ({redact(str(e)).splitlines()[0][:200]}); trials log unnested")
        return ""


def _enqueue_reference(study, setup: StudySetup) -> None:
    """Queue the ``--reference`` trial once (again if every earlier copy failed)."""
    from optuna.trial import TrialState

    if setup.reference is None:
        return
    if not any(t.user_attrs.get("reference") for t in study.get_trials(deepcopy=False)
               if t.state != TrialState.FAIL):
        study.enqueue_trial(setup.reference, user_attrs={"reference": True})


class _StudyLoop:
    """Keeps ``--parallel`` trials running as Ray tasks until ``--trials`` have finished."""

    def __init__(self, opts: TuneOptions, setup: StudySetup, study, confirming: bool = False):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # confirming: ``study`` is the confirmation study; run what is queued in it, no more
        self.opts, self.setup, self.study, self.confirming = opts, setup, study, confirming
        cluster = ray.cluster_resources()
        self.cpus, self.gpus = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
        self.here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                   soft=True)
        self.running: dict = {}  # ray ref -> (trial, start time)
        self.failures, self.last_beat, self.owner = 0, time.time(), owner_of_this_process()

    def run(self, progress: bool) -> None:
        import ray
        from tqdm import tqdm

        opts, study = self.opts, self.study
        total = _finished(study) + _waiting(study) if self.confirming else opts.trials
        self.bar = tqdm(total=total, initial=min(_finished(study), total),
                        disable=not progress, unit="run" if self.confirming else "trial",
                        desc=f"confirm {opts.study}" if self.confirming else f"study {opts.study}",
                        dynamic_ncols=True)
        while True:
            done = _finished(study)
            self.bar.n = min(done, total)
            if not self.confirming:
                self.bar.set_postfix_str(best_text(study, opts.objectives), refresh=True)
            while len(self.running) < opts.parallel and (
                    _waiting(study) > 0 if self.confirming else done + len(self.running) < total):
                self.launch()
            if not self.running:
                break
            ready, _ = ray.wait(list(self.running), num_returns=1, timeout=opts.heartbeat_s)
            self.heartbeat()
            for ref in ready:
                self.collect(ref)
        self.bar.n = min(_finished(study), total)
        if not self.confirming:
            self.bar.set_postfix_str(best_text(study, opts.objectives), refresh=True)
        self.bar.close()

    def launch(self) -> None:
        """Ask Optuna for a trial and start its run (a config the schema forbids fails it)."""
        from optuna.trial import TrialState

        from tuning.trial import run_trial

        study, setup, opts = self.study, self.setup, self.opts
        trial = study.ask()
        params = setup.space.suggest(trial)
        trial.set_user_attr(OWNER, self.owner)
        trial.set_user_attr(HEARTBEAT, time.time())
        seed = trial.user_attrs.get(CONFIRM_SEED) if self.confirming else None
        try:
            cfg = trial_config(setup, params, trial.number, self.cpus, self.gpus, seed)
        except ConfigError as e:
            # A combination the schema forbids (e.g. min_bits > max_bits): skip it.
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=TrialState.FAIL)
            self.failed(str(e))
            return
        trial.set_user_attr("config", config_mod.to_toml(cfg))
        trial.set_user_attr("run_dir", str(Path(cfg.out_dir) / cfg.name))
        info = {"objectives": opts.objectives,
                "prune": setup.pruner != "none" and not self.confirming,
                "pruner": setup.pruner, "pruner_startup": opts.pruner_startup,
                "storage": setup.storage_url, "study": opts.study, "trial_number": trial.number}
        ref = run_trial.options(scheduling_strategy=self.here).remote(cfg, info)
        self.running[ref] = (trial, time.perf_counter())

    def heartbeat(self) -> None:
        """Mark running trials alive, so a resume tells them from a dead driver's."""
        if time.time() - self.last_beat >= self.opts.heartbeat_s:
            for trial, _ in self.running.values():
                trial.set_user_attr(HEARTBEAT, time.time())
            self.last_beat = time.time()

    def collect(self, ref) -> None:
        import ray

        trial, t0 = self.running.pop(ref)
        try:
            res = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - worker died, OOM, ...
            res = {"status": "error", "error": f"{type(e).__name__}: "
                   f"{(str(e).splitlines() or [''])[0]}"}
        if _tell(self.setup, self.study, trial, res, time.perf_counter() - t0):
            self.failures = 0
            return
        error = res.get("error", "objective is not a number").splitlines()[0]
        self.bar.write(f"trial {trial.number} failed: {error}")
        self.failed(error)

    def failed(self, error: str) -> None:
        self.failures += 1
        if self.failures >= self.opts.max_failures:
            raise ConfigError(f"{self.failures} trials failed in a row; last: {error}")

    def requeue_running(self) -> None:
        """Ctrl-C or an error: what was running is lost; mark it failed and queue it again
        so the same command retries it."""
        import ray
        from optuna.trial import TrialState

        for ref, (trial, _) in self.running.items():
            ray.cancel(ref, force=True)
            trial.set_user_attr("error", "interrupted")
            self.study.tell(trial, state=TrialState.FAIL)
            self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, **{
                k: trial.user_attrs[k] for k in KEPT if k in trial.user_attrs}})


def _tell(setup: StudySetup, study, trial, res: dict, trial_s: float) -> bool:
    """Record a trial's result; True if it completed or was pruned."""
    from optuna.trial import TrialState

    trial.set_user_attr("trial_s", trial_s)
    if "run_s" in res:
        trial.set_user_attr("run_s", res["run_s"])
    if res.get("rounds"):
        trial.set_user_attr("rounds", res["rounds"])
    if res["status"] == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        return True
    if res["status"] != "ok":
        trial.set_user_attr("error", res["error"])
        study.tell(trial, state=TrialState.FAIL)
        return False
    s = res["summary"]
    for k in ("fid", "energy_j", "uplink_bytes", "asr", "asr_defended", "wall_s", "stragglers",
              "final_loss"):
        if s.get(k) is not None:
            trial.set_user_attr(k, s[k])
    values = _values(setup, s)
    if not all(math.isfinite(v) for v in values):
        trial.set_user_attr("error", "objective is not a number")
        study.tell(trial, state=TrialState.FAIL)
        return False
    for name, op, bound in setup.constraints:
        v = s.get(OBJECTIVES[name][0])
        v = math.inf if v is None else float(v)
        trial.set_constraint(f"{name}{op}{bound:g}", v - bound if op == "<=" else bound - v)
    study.tell(trial, values if len(values) > 1 else values[0])
    return True
