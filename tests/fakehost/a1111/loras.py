# Test data, not a host file: small kohya-format LoRA files for the tiny SD1.5-shaped model of this fake host.
from __future__ import annotations

import csv
import os

import safetensors.torch
import torch

TABLE = os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", "data", "sd15-unet-lora-layers-trimmed.tsv")


def unet_rows() -> list[dict[str, str]]:
    with open(TABLE, encoding="utf8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def attention_keys() -> list[str]:
    return [r["kohya_key"] for r in unet_rows() if "_attn" in r["kohya_key"]]


TE_KEYS = [f"lora_te_text_model_encoder_layers_0_{s}" for s in
           ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")]


def write_lora(path: str, model, unet_keys: list[str], *, rank: int = 2, alpha: float = 1.0, seed: int = 0,
               scale: float = 0.5, te: bool = True, metadata: dict[str, str] | None = None,
               full_keys: list[str] = ()) -> str:
    """kohya keys with lora_down/lora_up/alpha; `full_keys` get a LyCORIS "diff" (full weight difference)."""
    rows = {r["kohya_key"]: r for r in unet_rows()}
    modules = dict(model.model.named_modules())
    te_modules = dict(model.cond_stage_model.wrapped.named_modules())
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def weight_of(key):
        if key in rows:
            name = rows[key]["module"].removeprefix("model.")
            return modules[name].weight
        return te_modules["transformer.text_model.encoder.layers.0." + key.split("layers_0_")[1]
                          .replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")].weight

    for key in list(unet_keys) + (TE_KEYS if te else []):
        w = weight_of(key)
        if key in full_keys:
            sd[f"{key}.diff"] = torch.randn(w.shape, generator=g) * scale * 0.2
            continue
        out_ch, in_ch = w.shape[0], w.shape[1]
        if w.dim() == 4:
            down = torch.randn(rank, in_ch, *w.shape[2:], generator=g) * scale
            up = torch.randn(out_ch, rank, 1, 1, generator=g) * scale
        else:
            down = torch.randn(rank, in_ch, generator=g) * scale
            up = torch.randn(out_ch, rank, generator=g) * scale
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        sd[f"{key}.alpha"] = torch.tensor(float(alpha))
    safetensors.torch.save_file(sd, path, metadata=metadata or {"ss_network_dim": str(rank)})
    return path
