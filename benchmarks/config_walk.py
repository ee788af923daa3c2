"""How the config travels through ``ssdiff run`` on the driver (issue: "one layout a
newcomer reads at once").

Every call of a project function that receives the run's ``Config`` (the whole object, as an
argument) is a *visit*; its *room* is the function's module. Consecutive visits in one room
are one *stay*. A stay in a room whose function is still on the call stack below is a *climb
back up* (the walk returned to a caller that then handed the config on again); a stay in a
room seen before is a *return*. A newcomer follows the config with fewer climbs and returns.

    python benchmarks/config_walk.py [OUT.json]   # tiny run on the built-in digits, local Ray

The figure before the layout change comes from the same script in a checkout of d43ed39
(``git worktree add /tmp/old d43ed39; cp benchmarks/config_walk.py /tmp/old/benchmarks/;
PYTHONPATH=/tmp/old python /tmp/old/benchmarks/config_walk.py before.json``).

Writes benchmarks/results/config_walk.json: the stays in order, each room's entry count,
the climbs and returns.
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

from provenance import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (driver/ and service/ too: the layout before they moved into ssdiff_ray, for the baseline)
PROJECT = tuple(str(ROOT / p) for p in ("ssdiff_ray", "actors", "tuning", "driver", "service"))
TINY = ["model.preset=tiny", "model.timesteps=100", "clients.count=6", "clients.pools=2",
        "rounds=2", "train.local_steps=2", "train.batch_size=8", "eval.samples=40",
        "eval.steps=4", "eval.grid=16", "eval.baseline=false"]


def trace_visits(fn, config_type) -> list[tuple[str, str, tuple[str, ...]]]:
    """Run ``fn()``; every project call with a ``config_type`` argument, in call order:
    (module, function, the modules of the project frames below it)."""
    visits: list[tuple[str, str, tuple[str, ...]]] = []

    def module(frame) -> str:
        return frame.f_globals.get("__name__", "?")

    def profile(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(PROJECT):
            return
        code = frame.f_code
        args = [frame.f_locals.get(n) for n in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]]
        if any(isinstance(a, config_type) for a in args):
            below, f = [], frame.f_back
            while f is not None:
                if f.f_code.co_filename.startswith(PROJECT):
                    below.append(module(f))
                f = f.f_back
            visits.append((module(frame), code.co_name, tuple(below)))

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return visits


def walk(visits) -> dict:
    """Stays, climbs back up, returns and entries per room, from the visits."""
    stays: list[dict] = []
    for mod, func, below in visits:
        if stays and stays[-1]["room"] == mod:
            stays[-1]["functions"].append(func)
            continue
        seen = {s["room"] for s in stays}
        stays.append({"room": mod, "functions": [func], "climb": mod in below,
                      "return": mod in seen})
    entered = Counter(s["room"] for s in stays)
    return {"stays": len(stays), "rooms": len(entered),
            "climbs_back_up": sum(s["climb"] for s in stays),
            "returns": sum(s["return"] for s in stays),
            "most_entered": entered.most_common(5), "walk": stays}


def main() -> int:
    import dataclasses

    from ssdiff_ray import api, config

    out = Path(tempfile.mkdtemp(prefix="ssdiff-walk-"))
    cfg = config.load(None, [*TINY, f"out_dir={out}"])
    visits = trace_visits(lambda: api.run(cfg, progress=False), config.Config)
    res = walk(visits)
    # the same walk when a call that receives one of the config's sections (cfg.data, ...)
    # counts as a visit too
    sections = tuple({type(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                      if dataclasses.is_dataclass(getattr(cfg, f.name))})
    cfg = config.load(None, [*TINY, f"out_dir={out}", "name=sections"])
    with_sections = walk(trace_visits(lambda: api.run(cfg, progress=False),
                                      (config.Config, *sections)))
    res["with_sections"] = {k: v for k, v in with_sections.items() if k != "walk"}
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks" / "results" / "config_walk.json"
    write_json(dest, res, TINY)
    print(f"{res['stays']} stays in {res['rooms']} rooms, {res['climbs_back_up']} climbs back "
          f"up, {res['returns']} returns; most entered: {res['most_entered']}")
    for s in res["walk"]:
        mark = " (climb)" if s["climb"] else " (return)" if s["return"] else ""
        print(f"  {s['room']}: {', '.join(s['functions'])}{mark}")
    w = res["with_sections"]
    print(f"counting calls that receive a section too: {w['stays']} stays in {w['rooms']} rooms, "
          f"{w['climbs_back_up']} climbs back up, {w['returns']} returns; most entered: "
          f"{w['most_entered']}")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
