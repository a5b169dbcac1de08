# Test data, not a host file: small kohya-format LoRA files for the tiny SD1.5-shaped model of this fake host.
from __future__ import annotations

import csv
import os

import safetensors.torch
import torch

DATA = os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", "data")
TABLE = os.path.join(DATA, "sd15-unet-lora-layers-trimmed.tsv")
SDXL_TABLE = os.path.join(DATA, "sdxl-unet-layers.tsv")


def unet_rows(table: str = TABLE) -> list[dict[str, str]]:
    with open(table, encoding="utf8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def attention_keys() -> list[str]:
    return [r["kohya_key"] for r in unet_rows() if "_attn" in r["kohya_key"]]


TE_KEYS = [f"lora_te_text_model_encoder_layers_0_{s}" for s in
           ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")]


def write_lora(path: str, model, unet_keys: list[str], *, rank: int = 2, alpha: float = 1.0, seed: int = 0,
               scale: float = 0.5, te: bool = True, metadata: dict[str, str] | None = None,
               full_keys: list[str] = (), loha_keys: list[str] = (), extra: dict[str, torch.Tensor] | None = None) -> str:
    """kohya keys with lora_down/lora_up/alpha; `full_keys` get a LyCORIS "diff" (full weight difference),
    `loha_keys` LyCORIS LoHa factors (hada_w1_a/b, hada_w2_a/b) of the same rank; `extra` tensors are written as
    they are (e.g. a norm layer's w_norm / b_norm)."""
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
        if key in loha_keys:
            for i in (1, 2):
                sd[f"{key}.hada_w{i}_a"] = torch.randn(out_ch, rank, generator=g) * scale
                sd[f"{key}.hada_w{i}_b"] = torch.randn(rank, w[0].numel(), generator=g) * scale
            sd[f"{key}.alpha"] = torch.tensor(float(alpha))
            continue
        if w.dim() == 4:
            down = torch.randn(rank, in_ch, *w.shape[2:], generator=g) * scale
            up = torch.randn(out_ch, rank, 1, 1, generator=g) * scale
        else:
            down = torch.randn(rank, in_ch, generator=g) * scale
            up = torch.randn(out_ch, rank, generator=g) * scale
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        sd[f"{key}.alpha"] = torch.tensor(float(alpha))
    sd.update(extra or {})
    safetensors.torch.save_file(sd, path, metadata=metadata or {"ss_network_dim": str(rank)})
    return path


def write_sdxl_lora(path: str, model, *, misfits_only: bool = False, rank: int = 2, seed: int = 0,
                    scale: float = 0.5) -> list[str]:
    """An SDXL LoRA as kohya writes it, for the layers whose names this SD1.5 model shares with SDXL (real names
    from tests/data/sdxl-unet-layers.tsv). Each width is this model's width scaled by SDXL's real width over
    SD1.5's real width: a width the two families share fits, SDXL's 2048-wide cross-attention context does not.
    Returns the host's names of the layers that do not fit."""
    ours = {r["module"]: r for r in unet_rows()}
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(seed)
    sd, misfits = {}, []
    for row in unet_rows(SDXL_TABLE):
        mine = ours.get(row["module"])
        if mine is None:
            continue
        weight = modules[row["module"]].weight
        xl = [int(n) for n in row["weight_shape"].split("x")]
        sd15 = [int(n) for n in mine["weight_shape"].split("x")]
        out_ch, in_ch = (weight.shape[i] * xl[i] // sd15[i] for i in (0, 1))
        fits = (out_ch, in_ch) == tuple(weight.shape[:2])
        if fits and misfits_only:
            continue
        if not fits:
            misfits.append(mine["a1111_layer_name"])
        kernel = xl[2:]  # SDXL's proj_in / proj_out are Linear where SD1.5 has 1x1 convs
        key = row["kohya_key"]
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, in_ch, *kernel, generator=g) * scale
        sd[f"{key}.lora_up.weight"] = torch.randn(out_ch, rank, *[1] * len(kernel), generator=g) * scale
        sd[f"{key}.alpha"] = torch.tensor(1.0)
    safetensors.torch.save_file(sd, path, metadata={"ss_network_dim": str(rank), "ss_base_model_version": "sdxl_base_v1-0"})
    return misfits
