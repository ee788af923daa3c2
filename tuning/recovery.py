"""Resuming a study: which RUNNING trials were left by a driver that is gone.

Each trial records its driver (host, pid, process start time) and a heartbeat in the study's
storage; a trial whose driver process is dead on this host, or whose heartbeat is older than
``stale_after_s``, is marked FAIL and its parameters are queued again.
"""

from __future__ import annotations

import os
import socket
import time

OWNER = "ssdiff:owner"          # user attr: {"host", "pid", "ctime"} of the driver running it
HEARTBEAT = "ssdiff:heartbeat"  # user attr: time.time() of the driver's last sign of life
KEPT = ("reference", "confirm_of", "confirm_seed")  # user attrs a retried trial keeps


def owner_of_this_process() -> dict:
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(),
            "ctime": psutil.Process().create_time()}


def _alive(owner: dict) -> bool:
    import psutil

    try:
        return abs(psutil.Process(owner["pid"]).create_time() - owner["ctime"]) < 1e-3
    except (psutil.Error, KeyError, TypeError):
        return False


def recover_interrupted(study, storage, stale_after_s: float) -> list[int]:
    """Trials left RUNNING by a driver that is gone: mark FAIL, enqueue their params again.

    Gone = a dead process on this host, or no heartbeat for ``stale_after_s`` (other hosts).
    Returns the numbers of the trials recovered.
    """
    from optuna.trial import TrialState

    from tuning.storage import trial_id

    host, now, done = socket.gethostname(), time.time(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER)
        beat = t.user_attrs.get(HEARTBEAT, 0.0)
        local_dead = owner is not None and owner.get("host") == host and not _alive(owner)
        if not (local_dead or now - beat > stale_after_s):
            continue
        storage.set_trial_user_attr(trial_id(storage, study.study_name, t.number), "error",
                                    "interrupted (driver died)")
        study.tell(t.number, state=TrialState.FAIL)
        params = t.params or t.system_attrs.get("fixed_params", {})
        if params:
            attrs = {"retry_of": t.number}
            for k in KEPT:  # what the trial is for survives the retry
                if k in t.user_attrs:
                    attrs[k] = t.user_attrs[k]
            study.enqueue_trial(params, user_attrs=attrs)
        done.append(t.number)
    return done
