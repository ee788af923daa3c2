"""Low-rank adapters (LoRA, Hu et al. 2021) on a diffusers UNet, through peft.

peft's ``inject_adapter_in_model`` works on any torch module, so UNet2DModel (which lacks
diffusers' ``add_adapter``) and UNet2DConditionModel take adapters the same way. Each
adapted layer computes W x + (alpha / r) B A x with A (r x fan_in) and B (out x r); only A
and B train (B only, with A frozen, for FFA-LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from ssdiff_ray.config import lora_targets

ADAPTER = "default"


def lora_config(lora) -> LoraConfig:
    """peft's LoraConfig from the ``[lora]`` config section."""
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora_targets(lora.target_modules), init_lora_weights=True)


def add_lora(unet: torch.nn.Module, lora, seed: int) -> torch.nn.Module:
    """Inject adapters (in place) and leave only them trainable; FFA-LoRA freezes A.
    A's random initialisation comes from ``seed``: the same on every pool and the server."""
    torch.manual_seed(seed + 1)
    inject_adapter_in_model(lora_config(lora), unet, adapter_name=ADAPTER)
    freeze_a = lora.aggregation == "ffa"
    for name, p in unet.named_parameters():
        p.requires_grad = ".lora_B." in name or (".lora_A." in name and not freeze_a)
    return unet


@dataclass
class LoraLayerSlots:
    """Where one adapted layer's tensors sit in the model's flat parameter vector."""

    name: str
    a: tuple[int, tuple]      # (offset, shape) of A
    b: tuple[int, tuple]      # (offset, shape) of B
    base: tuple[int, tuple]   # (offset, shape) of the frozen base weight W
    scaling: float            # alpha / r


def lora_layers(unet: torch.nn.Module) -> list[LoraLayerSlots]:
    """Every adapted layer's slots in ``get_flat(unet)``."""
    offsets, pos = {}, 0
    for name, p in unet.named_parameters():
        offsets[name] = (pos, tuple(p.shape))
        pos += p.numel()
    return [LoraLayerSlots(name, offsets[f"{name}.lora_A.{ADAPTER}.weight"],
                           offsets[f"{name}.lora_B.{ADAPTER}.weight"],
                           offsets[f"{name}.base_layer.weight"], float(m.scaling[ADAPTER]))
            for name, m in unet.named_modules() if isinstance(m, LoraLayer)]


def merged_unet(unet: torch.nn.Module, with_adapters: bool = True) -> torch.nn.Module:
    """A plain diffusers UNet (no peft layers) with W + (alpha / r) B A in every adapted
    weight, or the base weights W alone (``with_adapters=False``)."""
    state = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items()
             if ".lora_" not in k}
    if with_adapters:
        for name, m in unet.named_modules():
            if isinstance(m, LoraLayer):
                state[f"{name}.weight"] = state[f"{name}.weight"] + m.get_delta_weight(ADAPTER).detach()
    plain = type(unet).from_config(unet.config)
    plain.load_state_dict(state)
    return plain.eval()


def save_adapter(unet: torch.nn.Module, path: str | Path, lora, base: str) -> None:
    """The adapter as peft saves one (adapter_model.safetensors + adapter_config.json):
    ``PeftModel.from_pretrained(base_unet, path)`` loads it onto ``base``'s UNet."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    # PeftModel keeps the model under base_model.model: its files name keys that way.
    save_file({f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in weights.items()},
              str(path / "adapter_model.safetensors"))
    conf = lora_config(lora)
    conf.base_model_name_or_path = base
    conf.save_pretrained(str(path))
    (path / "README.md").write_text(
        f"LoRA adapter (rank {lora.rank}, alpha {lora.alpha}) for the UNet of {base}.\n")
