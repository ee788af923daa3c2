"""LoRA fine-tuning of a pretrained model: the exact aggregation's algebra, the server path,
whole runs on a UNet2DModel and on a UNet2DConditionModel (Stable Diffusion's UNet class),
the saved adapter and merged pipeline, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel

from ssdiff_ray import api, codec, config
from ssdiff_ray.aggregation.lora_exact import product_residual
from ssdiff_ray.cli import main as cli_main
from ssdiff_ray.model.unet import context_table, get_flat

LORA = ["train.mode=lora", "lora.rank=2", "lora.alpha=2"]


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """A tiny UNet2DModel with attention, pretrained on digits 0-4 (once per session)."""
    out = tmp_path_factory.mktemp("pretrained") / "base"
    rc = cli_main(["pretrain", "--steps", "30", "--out", str(out), "--set", "model.preset=tiny_attn",
                   "--set", "model.timesteps=100", "--set", "data.classes=0-4"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def cond_base_dir(tmp_path_factory):
    """A tiny class-conditional UNet2DConditionModel (cross-attention) saved as a pipeline."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), num_class_embeds=11)
    out = tmp_path_factory.mktemp("pretrained") / "cond"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(out)
    return out


def test_exact_residual_makes_the_mean_of_products():
    rng = np.random.default_rng(0)
    a = [rng.normal(size=(4, 9)) for _ in range(3)]
    b = [rng.normal(size=(6, 4)) for _ in range(3)]
    w = [1.0, 2.0, 5.0]
    mean = lambda xs: sum(wi * x for wi, x in zip(w, xs)) / sum(w)  # noqa: E731
    naive = mean(b) @ mean(a)
    exact = naive + product_residual(a, b, w)
    np.testing.assert_allclose(exact, mean([bi @ ai for ai, bi in zip(a, b)]), atol=1e-10)
    assert np.abs(naive - exact).max() > 0.1  # the naive average is not the mean of products


def _server_round(cfg, rng, n=3, ranks=None):
    """One aggregation on a ParameterServer: n random adapter updates at 32 bits (of the
    given LoRA ranks: zero beyond a client's rank, which sends only its components)."""
    from actors.parameter_server import ParameterServer
    from ssdiff_ray.model.lora_ranks import rank_index, rank_layout
    from ssdiff_ray.round_results import TrainedChunk

    ps = ParameterServer(cfg, num_slots=1)
    ps.broadcast(1)
    ps.begin_round()
    ranks = [cfg.lora.rank] * n if ranks is None else ranks
    deltas, payloads = [], []
    for r in ranks:
        idx = rank_index(ps.uplink_part.layout, r)
        d = np.zeros(ps.num_params, np.float32)
        d[idx] = rng.normal(scale=0.05, size=len(idx))
        deltas.append(d)
        layout = codec.layout_id(rank_layout(ps.uplink_part.layout, r))
        payloads.append(codec.encode(d[idx], 32, 256, rng, layout))
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in payloads])])
    chunk = TrainedChunk(np.arange(n), np.zeros(n), np.zeros(n), np.diff(offsets), offsets,
                         np.zeros(n), np.zeros(n), 0, np.full(n, "", dtype=object))
    blob = np.frombuffer(b"".join(payloads), dtype=np.uint8)
    verdicts = ps.accumulate(0, chunk, blob, np.ones(n), np.full(n, 32), np.array(ranks))
    assert not any(verdicts.rejected_reason)
    old = ps.weights.copy()
    ps.finish_round()
    return ps, old, deltas


@pytest.mark.parametrize("aggregation,ranks", [("exact", None), ("naive", None),
                                               ("exact", [1, 2, 1])])
def test_server_aggregates_adapters(base_dir, aggregation, ranks):
    """Exact: every adapted layer's W + s B A is the pretrained W + s mean(B_i A_i) (float
    tolerance), with mixed ranks too; naive averages A and B and misses it."""
    from ssdiff_ray.model.adapters import lora_layers

    cfg = config.load(None, [*TINY, *LORA, f"model.pretrained={base_dir}",
                             f"lora.aggregation={aggregation}", "server.ema_decay=0"])
    ps, old, deltas = _server_round(cfg, np.random.default_rng(1), ranks=ranks)
    where = np.flatnonzero(ps.mask)
    worst = 0.0
    for layer in lora_layers(ps.unet):
        def mat(vec, slot):
            off, shape = slot
            return vec[off:off + int(np.prod(shape))].reshape(shape[0], -1).astype(np.float64)

        prods = []
        for d in deltas:
            client = old.copy()
            client[where] += d
            prods.append(mat(client, layer.b) @ mat(client, layer.a))
        want = mat(old, layer.base) + layer.scaling * np.mean(prods, axis=0)
        got = (mat(ps.weights, layer.base)
               + layer.scaling * mat(ps.weights, layer.b) @ mat(ps.weights, layer.a))
        worst = max(worst, float(np.abs(got - want).max()))
    if aggregation == "exact":
        assert worst < 1e-5
    else:
        assert worst > 1e-4


def test_rank_masked_training_moves_only_the_clients_components(base_dir):
    """A rank-1 client of a rank-2 adapter trains component 0 only (A row 0, B column 0)."""
    from ssdiff_ray.model.lora_ranks import rank_index
    from ssdiff_ray.model.unet import build_scheduler, param_layout, unet_for
    from ssdiff_ray.train import LocalTrainer

    cfg = config.load(None, [*TINY, *LORA, f"model.pretrained={base_dir}"])
    unet = unet_for(cfg)
    trainer = LocalTrainer(unet, build_scheduler(100).alphas_cumprod, lr=1e-2)
    images = np.random.default_rng(0).uniform(-1, 1, (16, 1, 16, 16)).astype(np.float32)
    delta, _ = trainer.train(get_flat(unet), images, steps=3, batch_size=8, seed=0, rank=1)
    mine = np.zeros(len(delta), bool)
    mine[rank_index(param_layout(unet, trainable_only=True), 1)] = True
    assert mine.sum() == len(delta) // 2
    assert np.abs(delta[~mine]).max() == 0 and np.abs(delta[mine]).max() > 0


def _run(overrides):
    # one pool: adapters and aggregation are tested here, not placement (each actor
    # process costs seconds of start-up on a 2-core CI)
    return api.run(config.load(None, [*overrides, "clients.pools=1"]), progress=False)


@pytest.mark.usefixtures("ray_local")
def test_lora_run_trains_only_adapters_and_saves_them(base_dir, tmp_path):
    s = _run([*TINY, *LORA, f"out_dir={tmp_path}", "name=lora", f"model.pretrained={base_dir}",
              "data.classes=5-9", "rounds=2", "quant.bits=8"])
    run = tmp_path / "lora"
    base = DDPMPipeline.from_pretrained(base_dir).unet
    full = sum(p.numel() for p in base.parameters())
    assert 0 < s["num_params"] < 0.1 * full  # the uplink carries the adapters only
    clients = pd.read_parquet(run / "clients.parquet")
    assert (clients["uplink_bytes"] == codec.encoded_size(s["num_params"], 8, 256)).all()
    # The adapter loads with plain diffusers + peft onto its base and equals the merged model.
    from peft import PeftModel

    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["base_model_name_or_path"] == str(run / "adapter_base")
    tuned = PeftModel.from_pretrained(DDPMPipeline.from_pretrained(cfg["base_model_name_or_path"])
                                      .unet, run / "adapter").merge_and_unload()
    merged = DDPMPipeline.from_pretrained(run / "model").unet
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 60])
    with torch.no_grad():
        a, b, c = tuned(x, t).sample, merged(x, t).sample, base(x, t).sample
    assert torch.allclose(a, b, atol=1e-5)
    assert (b - c).abs().max() > 1e-3  # fine-tuning changed the model
    # Only attention projections (the targets) and nothing else moved from the base.
    changed = {k for k, v in merged.state_dict().items()
               if not torch.equal(v, base.state_dict()[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for k in changed)


@pytest.mark.usefixtures("ray_local")
def test_ffa_with_mixed_ranks(base_dir, tmp_path):
    """FFA-LoRA keeps A at its shared initialisation and uploads B only; device classes train
    and upload their own ranks (the ledger records them)."""
    from safetensors.torch import load_file

    from ssdiff_ray.model.unet import unet_for

    mix = "{mcu = 1, rpi4 = 1, jetson_nano = 1, jetson_orin = 2, phone = 2, gateway = 2}"
    sets = [*TINY, *LORA, f"model.pretrained={base_dir}", "lora.aggregation=ffa"]
    s = _run([*sets, f"out_dir={tmp_path}", "name=ffa", "rounds=1", "quant.bits=8",
              f"lora.rank_by_class={mix}", "devices.class_mix={mcu = 1, phone = 1}"])
    run = tmp_path / "ffa"
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert s["num_params"] == sum(v.numel() for k, v in weights.items() if "lora_B" in k)
    init = {k: v for k, v in unet_for(config.load(None, sets)).state_dict().items()
            if "lora_A" in k}
    a = {k.removeprefix("base_model.model.").replace(".weight", ".default.weight"): v
         for k, v in weights.items() if "lora_A" in k}
    assert a.keys() == init.keys() and all(torch.equal(v, init[k]) for k, v in a.items())
    clients = pd.read_parquet(run / "clients.parquet")
    assert set(clients["lora_rank"]) == {1, 2} and not clients["dropped"].any()
    for rank, want in ((1, s["num_params"] // 2), (2, s["num_params"])):
        sent = clients.loc[clients["lora_rank"] == rank, "uplink_bytes"]
        assert (sent == codec.encoded_size(want, 8, 256)).all()


@pytest.mark.usefixtures("ray_local")
def test_lora_round_on_a_conditional_unet2dconditionmodel(cond_base_dir, tmp_path):
    """Stable Diffusion's UNet class (cross-attention to a fixed class table) end to end."""
    s = _run([*TINY, *LORA, f"out_dir={tmp_path}", "name=cond", f"model.pretrained={cond_base_dir}",
              "model.conditional=true", "rounds=1", "eval.guidance=1.5"])
    run = tmp_path / "cond"
    assert np.isfinite(s["fid"])
    from peft import PeftModel

    base = DDPMPipeline.from_pretrained(cond_base_dir).unet
    assert type(base).__name__ == "UNet2DConditionModel"
    tuned = PeftModel.from_pretrained(DDPMPipeline.from_pretrained(run / "adapter_base").unet,
                                      run / "adapter").merge_and_unload()
    merged = DDPMPipeline.from_pretrained(run / "model").unet
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 60]), torch.tensor([2, 7])
    ctx = context_table(11, 16)[y]
    with torch.no_grad():
        a = tuned(x, t, encoder_hidden_states=ctx, class_labels=y).sample
        b = merged(x, t, encoder_hidden_states=ctx, class_labels=y).sample
        c = base(x, t, encoder_hidden_states=ctx, class_labels=y).sample
    assert torch.allclose(a, b, atol=1e-5) and (b - c).abs().max() > 1e-4


@pytest.mark.usefixtures("ray_local")
def test_attack_and_screening_in_lora_mode(base_dir, tmp_path):
    """A malicious client can only change its adapter; Krum screens the adapter updates and
    drops the two boosted (model-replacement) ones."""
    from ssdiff_ray.attacks import attack_spec

    sets = [*TINY, *LORA, f"out_dir={tmp_path}", "name=atk", f"model.pretrained={base_dir}",
            "rounds=1", "attack.kind=baddiffusion", "attack.malicious_fraction=0.34",
            "attack.scale=20", "server.aggregator=multi_krum", "server.krum_f=2",
            "defense.estimate_trigger=false", "attack.eval_samples=10"]
    s = _run(sets)
    malicious = sorted(attack_spec(config.load(None, sets)).malicious_ids)
    clients = pd.read_parquet(tmp_path / "atk" / "clients.parquet")
    dropped = sorted(clients.loc[clients["drop_reason"] == "screened", "client_id"])
    assert len(malicious) == 2 and dropped == malicious
    asr = pd.read_parquet(tmp_path / "atk" / "rounds.parquet")["asr"].iloc[-1]
    # krum dropped both attackers' updates, so the model never learned the trigger
    assert asr <= 0.2 and s["num_params"] < 0.1 * get_flat(
        DDPMPipeline.from_pretrained(base_dir).unet).size


def _fails(args, tmp_path, capsys) -> str:
    rc = cli_main(["run", "--set", f"out_dir={tmp_path}", *(a for s in args for a in ("--set", s))])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing started, nothing written
    return err


def test_bad_pretrained_inputs(base_dir, tmp_path, capsys):
    assert "not a diffusers UNet2DModel" in _fails([f"model.pretrained={tmp_path}"], tmp_path, capsys)
    assert "no such directory" in _fails([f"model.pretrained={tmp_path}/nope"], tmp_path, capsys)
    err = _fails([f"model.pretrained={base_dir}", *LORA, "lora.target_modules=to_qq"], tmp_path, capsys)
    assert "'to_qq' matches no layer" in err
    err = _fails([f"model.pretrained={base_dir}", *LORA, "lora.rank=64"], tmp_path, capsys)
    assert "lora.rank = 64: larger than layer" in err
    err = _fails([f"model.pretrained={base_dir}", "data.name=colour_digits"], tmp_path, capsys)
    assert "takes 1 channels, the data has 3" in err
    assert "needs model.pretrained" in _fails(LORA, tmp_path, capsys)
    err = _fails([f"model.pretrained={base_dir}", *LORA, "quant.downlink_bits=8"], tmp_path, capsys)
    assert "quant.downlink_bits = 8" in err


def test_pretrain_never_overwrites(base_dir, capsys):
    before = sorted(p.name for p in base_dir.rglob("*"))
    assert cli_main(["pretrain", "--steps", "1", "--out", str(base_dir)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in base_dir.rglob("*")) == before


def test_a_hub_id_that_cannot_be_fetched_says_how_to_pass_a_directory(tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine has no hub access either way
    err = _fails(["model.pretrained=nobody/no-such-model"], tmp_path, capsys)
    assert "could not fetch it from the Hugging Face hub" in err and "model.pretrained=DIR" in err


def test_lora_training_flops_count_the_frozen_base(base_dir):
    """Full: 3x the forward pass; LoRA: 2x the frozen base's forward + 3x the adapters'."""
    from ssdiff_ray.model.unet import flops_per_sample_step, unet_for

    full = flops_per_sample_step(unet_for(config.load(None, [*TINY, f"model.pretrained={base_dir}"])))
    lora = flops_per_sample_step(unet_for(config.load(None, [*TINY, *LORA,
                                                             f"model.pretrained={base_dir}"])))
    assert 2 / 3 * full < lora < 0.7 * full
