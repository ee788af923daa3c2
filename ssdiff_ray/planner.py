"""Planning one round on the driver, vectorised: who trains, at which bits, at what cost.

Selection, the policy's decision and the simulated channel/energy costs all happen here
before any client trains, so a predicted straggler is never trained (its energy still
counts) and the loop never waits for it in wall time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssdiff_ray import codec, energy
from ssdiff_ray.config import Config
from ssdiff_ray.model.lora_ranks import client_rank, rank_params
from ssdiff_ray.policies import RoundContext, make_policy
from ssdiff_ray.run_dir import Prepared


@dataclass
class RoundPlan:
    round: int
    client_ids: np.ndarray
    bits: np.ndarray
    local_steps: np.ndarray
    num_samples: np.ndarray
    tx_power_w: np.ndarray
    cpu_hz: np.ndarray
    costs: dict[str, np.ndarray]  # energy.round_costs output, per client
    straggler: np.ndarray         # bool: misses the deadline, not trained
    ranks: np.ndarray | None = None  # LoRA rank each client trains (mixed ranks), else None


class RoundPlanner:
    """Plans each round with the config's policy, and remembers what clients reported
    (its state: ``state_dict`` / ``load_state_dict`` for checkpoints)."""

    def __init__(self, cfg: Config, prep: Prepared, num_params: int,
                 flops_per_sample_step: float, num_pools: int = 1,
                 download_params: int | None = None):
        self.cfg = cfg
        self.num_pools = num_pools
        self.prep = prep
        self.policy = make_policy(cfg)
        self.num_params = num_params
        self.flops_per_sample_step = flops_per_sample_step
        self.channel = energy.ChannelConfig.from_config(cfg.devices)
        self.per_round = max(1, int(round(cfg.clients.per_round * cfg.clients.count)))
        self.last_loss = np.full(cfg.clients.count, np.nan)
        self.last_norm = np.full(cfg.clients.count, np.nan)
        self.loss_history: list[float] = []  # mean training loss of each past round
        # What a client downloads: the model (or the adapters, and the base weights that
        # exact LoRA aggregation moves), which may differ from what it uploads (num_params).
        self.download_bytes = codec.encoded_size(download_params or num_params,
                                                 cfg.quant.downlink_bits,
                                                 cfg.quant.block_size)

    def select(self, round_: int) -> np.ndarray:
        """Uniform sample of ``per_round`` clients, stratified over the pools.

        Client ``i`` lives in pool ``i % num_pools`` (its state stays there), so each pool
        gets an equal share of the round's clients and no pool idles while another works.
        """
        rng = np.random.default_rng([self.cfg.seed, round_, 1])
        n, p = self.cfg.clients.count, self.num_pools
        k = min(self.per_round, n)
        sizes = np.array([len(range(s, n, p)) for s in range(p)])
        share = np.minimum(np.full(p, k // p), sizes)
        extra = k - share.sum()  # the remainder goes to randomly chosen pools with room
        for s in rng.permutation(p):
            if extra == 0:
                break
            take = min(extra, sizes[s] - share[s])
            share[s] += take
            extra -= take
        picks = [s + p * rng.choice(sizes[s], size=share[s], replace=False) for s in range(p)]
        return np.sort(np.concatenate(picks)).astype(np.int64)

    def plan(self, round_: int) -> RoundPlan:
        cfg = self.cfg
        ids = self.select(round_)
        prof = self.prep.population.iloc[ids]
        cap = cfg.devices.tx_power_cap_w
        if np.isfinite(cap):  # the policy must plan with the power the device will really have
            tx_max = np.minimum(prof["tx_power_w_max"].to_numpy(), cap)
            prof = prof.assign(tx_power_w_max=tx_max,
                               tx_power_w_min=np.minimum(prof["tx_power_w_min"].to_numpy(), tx_max))
        steps = self.prep.local_steps[ids]
        batch = np.minimum(cfg.train.batch_size, self.prep.num_samples[ids])
        flops = self.flops_per_sample_step * batch * steps
        rng = np.random.default_rng([cfg.seed, round_, 2])
        gain = energy.channel_gain(prof["distance_m"].to_numpy(), prof["shadowing_db"].to_numpy(),
                                   rng)
        bandwidth = np.full(len(ids), cfg.devices.bandwidth_hz / len(ids))
        ctx = RoundContext(
            round=round_, client_ids=ids, profiles=prof, num_params=self.num_params,
            block_size=cfg.quant.block_size, num_samples=self.prep.num_samples[ids],
            local_flops=flops, channel_gain=gain, bandwidth_hz=bandwidth,
            deadline_s=cfg.devices.deadline_s, last_loss=self.last_loss[ids],
            loss_history=list(self.loss_history), update_norm=self.last_norm[ids],
            download_bytes=self.download_bytes)
        decision = self.policy.choose(ctx)
        tx_max = prof["tx_power_w_max"].to_numpy()
        tx_min = prof["tx_power_w_min"].to_numpy()
        tx = tx_max if decision.tx_power_w is None else np.clip(decision.tx_power_w, tx_min, tx_max)
        f_max = prof["cpu_hz_max"].to_numpy()
        f_min = prof["cpu_hz_min"].to_numpy()
        cpu = (np.maximum(f_min, cfg.devices.cpu_scale * f_max) if decision.cpu_hz is None
               else np.clip(decision.cpu_hz, f_min, f_max))
        bits = decision.bits.astype(np.int64)
        ranks = self.ranks(prof)  # a smaller LoRA rank uploads fewer values
        sizes = np.full(len(ids), self.num_params) if ranks is None else \
            np.array([rank_params(self.num_params, int(r), cfg.lora.rank) for r in ranks])
        if len(np.unique(bits)) > 1 or len(np.unique(sizes)) > 1:
            upload = np.array([codec.encoded_size(int(n), int(b), cfg.quant.block_size)
                               for n, b in zip(sizes, bits)], dtype=np.int64)
        else:
            upload = np.full(len(ids), codec.encoded_size(int(sizes[0]), int(bits[0]),
                                                          cfg.quant.block_size), dtype=np.int64)
        costs = energy.round_costs(prof, flops, upload, self.download_bytes, tx, cpu, gain,
                                   bandwidth, self.channel)
        costs["upload_bytes"] = upload
        straggler = energy.stragglers(costs["total_s"], cfg.devices.deadline_s)
        return RoundPlan(round_, ids, bits, steps, self.prep.num_samples[ids], tx, cpu, costs,
                         straggler, ranks)

    def ranks(self, profiles) -> np.ndarray | None:
        """The LoRA rank each client trains (None in full mode)."""
        lora = self.cfg.lora
        if self.cfg.train.mode != "lora":
            return None
        return np.array([client_rank(c, lora) for c in profiles["device_class"]], dtype=np.int64)

    def observe(self, plan: RoundPlan, loss: np.ndarray, norm: np.ndarray) -> float:
        """Remember what trained clients reported (NaN: not trained), for the policies of
        later rounds; returns the round's sample-weighted mean loss."""
        ok = np.isfinite(loss)
        mean_loss = float(np.average(loss[ok], weights=plan.num_samples[ok])) \
            if ok.any() else float("nan")
        self.loss_history.append(mean_loss)
        self.last_loss[plan.client_ids[ok]] = loss[ok]
        self.last_norm[plan.client_ids[ok]] = norm[ok]
        return mean_loss

    def state_dict(self) -> dict:
        return {"last_loss": self.last_loss, "last_norm": self.last_norm,
                "loss_history": list(self.loss_history)}

    def load_state_dict(self, state: dict) -> None:
        self.last_loss = state["last_loss"]
        self.last_norm = state["last_norm"]
        self.loss_history = list(state["loss_history"])
