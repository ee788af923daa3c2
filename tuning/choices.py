"""The choice lists of ``ssdiff tune``: objectives, samplers and pruners by name.

The one home of each list: the command line (``tuning.cli``), the study's checks
(``tuning.study``) and the trials (``tuning.trial``) read them from here. A sampler or
pruner is a factory that imports Optuna only when it builds one, so the command line reads
the names without loading Optuna or Ray.
"""

from __future__ import annotations

# Objective name -> (summary/round key, how it accumulates over rounds for pruning).
OBJECTIVES = {
    "energy": ("energy_j", "sum"),
    "fid": ("fid", "last"),
    "bytes": ("uplink_bytes", "sum"),
    "asr": ("asr", "last"),
    "asr_defended": ("asr_defended", "last"),
}


def _tpe(startup: int, seed: int | None):
    import optuna

    return optuna.samplers.TPESampler(n_startup_trials=startup, seed=seed, multivariate=True)


def _nsga2(startup: int, seed: int | None):
    import optuna

    return optuna.samplers.NSGAIISampler(population_size=max(2, startup), seed=seed)


def _random(startup: int, seed: int | None):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


# Sampler name -> factory(startup trials, seed).
SAMPLERS = {"tpe": _tpe, "nsga2": _nsga2, "random": _random}


def _median(rounds: int, startup: int):
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0)


def _hyperband(rounds: int, startup: int):
    import optuna

    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(rounds, 1))


def _nop(rounds: int, startup: int):
    import optuna

    return optuna.pruners.NopPruner()


# Pruner name -> factory(rounds, finished trials before it prunes).
PRUNERS = {"median": _median, "hyperband": _hyperband, "none": _nop}
# What --pruner takes: "auto" is median for a single objective, none for several.
PRUNER_CHOICES = ("auto", *PRUNERS)


def one_of(names) -> str:
    """``"a, b or c"``: the names for an error message."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
