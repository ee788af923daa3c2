"""Backdoor attacks on federated diffusion training.

A malicious client trains on batches where a fraction ``poison_rate`` of the rows is
replaced by a backdoor diffusion process, so that the ordinary sampler, started from
triggered noise, produces the attacker's target. One attack family per file, each an
``Attack`` (``base``); the list below is the one place families and their triggers are
registered (``attack.kind`` and ``attack.trigger`` read it). This file is torch-free:
the driver reads the lists and picks the malicious clients without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ssdiff_ray.attacks.patterns import ADDITIVE_TRIGGERS, TARGETS, TROJ_TRIGGERS, is_pattern_file
from ssdiff_ray.registry import load

# kind -> (implementation, the triggers it takes; names are unique across kinds)
ATTACKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "baddiffusion": ("ssdiff_ray.attacks.baddiffusion:BadDiffusion", ADDITIVE_TRIGGERS),
    "trojdiff": ("ssdiff_ray.attacks.trojdiff:TrojDiff", TROJ_TRIGGERS),
}
TRIGGERS = tuple(t for _, triggers in ATTACKS.values() for t in triggers)
# the samplers a BadDiffusion backdoor can be tuned to (``baddiffusion.trigger_coefficient``)
CORRECTIONS = ("ddim", "ddpm", "ode", "both")


def kind_of_trigger(trigger: str, default: str = "baddiffusion") -> str:
    """The attack family a trigger name belongs to; ``default`` for a trigger file (either
    family reads one)."""
    if is_pattern_file(trigger):
        return default
    for kind, (_, triggers) in ATTACKS.items():
        if trigger in triggers:
            return kind
    raise ValueError(f"unknown trigger {trigger!r}; choose from {', '.join(TRIGGERS)} or "
                     "a .png / .npy file")


def target_class(target: str) -> int | None:
    """K for a "class:K" target, else None."""
    return int(target.split(":", 1)[1]) if target.startswith("class:") else None


@dataclass(frozen=True)
class AttackSpec:
    """What the malicious clients do. ``scale`` > 1 is model replacement (Bagdasaryan et al.):
    the update is multiplied so it survives averaging with the benign ones."""

    kind: str = "baddiffusion"
    trigger: str = "box"  # a name of the kind's triggers, or a .png / .npy file
    target: str = "hat"  # a TARGETS name, "class:K", or a .png / .npy file
    poison_rate: float = 0.1
    gamma: float = 0.6  # TrojDiff noise scale of the trigger distribution
    scale: float = 1.0
    malicious_ids: frozenset[int] = field(default_factory=frozenset)
    sampler: str = "ddim"  # BadDiffusion's correction (baddiffusion.trigger_coefficient)
    channels: int = 1  # of the images: triggers and targets are grey (1) or coloured (3)

    def __post_init__(self):
        if self.kind not in ATTACKS:
            raise ValueError(f"attack kind {self.kind!r}; choose from {', '.join(ATTACKS)}")
        names = ATTACKS[self.kind][1]
        if self.trigger not in names and not is_pattern_file(self.trigger):
            raise ValueError(f"{self.kind} trigger {self.trigger!r}; choose from {names} "
                             "or a .png / .npy file")
        if (target_class(self.target) is None and self.target not in TARGETS
                and not is_pattern_file(self.target)):
            raise ValueError(f"target {self.target!r}; choose from {TARGETS}, 'class:K' or "
                             "a .png / .npy file")
        if self.channels not in (1, 3):
            raise ValueError(f"channels {self.channels}: triggers come in 1 or 3 channels")
        if not 0.0 <= self.poison_rate <= 1.0:
            raise ValueError(f"poison_rate {self.poison_rate} not in [0, 1]")
        object.__setattr__(self, "malicious_ids", frozenset(int(i) for i in self.malicious_ids))


def choose_malicious(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """A seeded random set of round(fraction * num_clients) client ids (at least 1 if > 0)."""
    k = round(fraction * num_clients)
    k = max(k, 1) if fraction > 0 else 0
    rng = np.random.default_rng(seed)
    return frozenset(int(i) for i in rng.choice(num_clients, size=k, replace=False))


def attack_spec(cfg) -> AttackSpec | None:
    """The attack the run config describes (None when ``attack.kind = 'none'``)."""
    a = cfg.attack
    if a.kind == "none":
        return None
    ids = choose_malicious(cfg.clients.count, a.malicious_fraction, cfg.seed)
    return AttackSpec(kind=a.kind, trigger=a.trigger or ATTACKS[a.kind][1][0], target=a.target,
                      poison_rate=a.poison_rate, gamma=a.gamma, scale=a.scale,
                      malicious_ids=ids, sampler=a.sampler, channels=cfg.data.channels or 1)


def make_attack(spec: AttackSpec, alphas_cumprod=None, target_images=None):
    """The ``Attack`` of ``spec``'s family. ``alphas_cumprod`` (the training schedule) is
    needed to poison, not to make triggered noise; ``target_images`` for a class target."""
    return load(ATTACKS[spec.kind][0])(spec, alphas_cumprod, target_images)
