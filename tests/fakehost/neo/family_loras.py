"""LoRA files for the fake Forge Neo's model families (backend/loader.py FAMILIES), in the key layouts Neo's key maps
read for each family, and which layers (and parts of fused layers) DynFuse should decide for a subject and a style
LoRA in given layouts.

Not a Forge Neo file: test support only. Layouts:

* "kohya" (sd-scripts, musubi-tuner, ai-toolkit's ComfyUI export): ``lora_unet_<path with _>.lora_down.weight`` /
  ``lora_up`` / ``alpha``, layers named by the model's paths (a fused qkv is one layer);
* "native": the model's own paths under ``diffusion_model.`` with peft factors (``lora_A`` / ``lora_B``), as ComfyUI
  saves them and as Z-Image's, Wan's and Qwen-Image's trainers (DiffSynth, musubi) write them;
* "diffusers": diffusers' names under ``transformer.`` with peft factors (ai-toolkit, SimpleTuner, diffusers):
  fused layers apart where diffusers has them apart (FLUX-style to_q / add_k_proj / proj_mlp, Z-Image's
  attention.to_q / to_k / to_v), Krea 2's to_q / ff.up, Qwen-Image's own paths;
* "bare": diffusers' names without a prefix (DiffSynth-Studio's Qwen-Image LoRAs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Family:
    layouts: tuple[str, ...]
    subject: tuple[str, ...]        # module paths under diffusion_model.
    style: tuple[str, ...]
    other: tuple[str, ...]
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)  # path suffix -> its parts, in channel order


_FLUX_FUSED = {"img_attn.qkv": ("q", "k", "v"), "txt_attn.qkv": ("q", "k", "v"), "linear1": ("q", "k", "v", "mlp")}
_FLUX_UNITS = dict(subject=("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "single_blocks.1.linear1",
                            "double_blocks.0.txt_attn.qkv", "double_blocks.1.img_mlp.2"),
                   style=("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "single_blocks.1.linear1",
                          "double_blocks.1.img_attn.qkv", "double_blocks.1.img_mlp.2", "double_blocks.0.img_mlp.0"),
                   other=("double_blocks.0.img_attn.qkv", "single_blocks.1.linear2", "double_blocks.1.img_mlp.2"))
_NEXTDIT_UNITS = dict(subject=("layers.0.attention.qkv", "layers.1.attention.qkv", "layers.0.feed_forward.w1",
                               "layers.1.feed_forward.w2"),
                      style=("layers.0.attention.qkv", "layers.1.attention.qkv", "layers.0.feed_forward.w1",
                             "layers.0.attention.out"),
                      other=("layers.0.attention.qkv", "layers.0.feed_forward.w3"))

FAMILIES = {
    "zimage": Family(("diffusers", "native", "kohya"), **_NEXTDIT_UNITS,
                     fused={"attention.qkv": ("q", "k", "v")}),
    "lumina2": Family(("native", "kohya"), **_NEXTDIT_UNITS, fused={"attention.qkv": ("q", "k", "v")}),
    "qwen": Family(("diffusers", "bare", "kohya"),
                   subject=("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                            "transformer_blocks.0.attn.to_v", "transformer_blocks.1.attn.add_q_proj",
                            "transformer_blocks.0.img_mlp.net.0.proj", "transformer_blocks.1.img_mod.1"),
                   style=("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                          "transformer_blocks.0.attn.to_v", "transformer_blocks.1.attn.add_q_proj",
                          "transformer_blocks.0.img_mlp.net.0.proj", "transformer_blocks.0.attn.to_out.0"),
                   other=("transformer_blocks.0.attn.to_q", "transformer_blocks.1.txt_mlp.net.2")),
    "chroma": Family(("diffusers", "native", "kohya"), **_FLUX_UNITS, fused=_FLUX_FUSED),
    "flux2": Family(("diffusers", "native", "kohya"), **_FLUX_UNITS, fused=_FLUX_FUSED),
    "wan": Family(("native", "kohya"),
                  subject=("blocks.0.self_attn.q", "blocks.0.self_attn.k", "blocks.0.self_attn.v", "blocks.0.ffn.0",
                           "blocks.1.cross_attn.o", "blocks.1.self_attn.o"),
                  style=("blocks.0.self_attn.q", "blocks.0.self_attn.k", "blocks.0.self_attn.v", "blocks.0.ffn.0",
                         "blocks.1.cross_attn.o", "blocks.0.cross_attn.k"),
                  other=("blocks.0.self_attn.q", "blocks.1.ffn.2")),
    "krea2": Family(("diffusers", "native", "kohya"),
                    subject=("blocks.0.attn.wq", "blocks.0.attn.wk", "blocks.0.attn.wv", "blocks.1.mlp.up",
                             "blocks.0.attn.gate"),
                    style=("blocks.0.attn.wq", "blocks.0.attn.wk", "blocks.0.attn.wv", "blocks.1.mlp.up",
                           "blocks.1.attn.wo"),
                    other=("blocks.0.attn.wq", "blocks.1.mlp.down")),
}

_KREA2 = {"attn.wq": "attn.to_q", "attn.wk": "attn.to_k", "attn.wv": "attn.to_v", "attn.gate": "attn.to_gate",
          "attn.wo": "attn.to_out.0", "mlp.gate": "ff.gate", "mlp.up": "ff.up", "mlp.down": "ff.down"}


def diffusers_names(family: str, path: str, shape: tuple[int, int]) -> list[tuple[str, tuple[int, int]]]:
    """A module's diffusers name(s), each with the output rows (start, length) of the module it covers."""
    out, hidden = shape
    block, _, rest = path.partition(".")
    index, _, layer = rest.partition(".")
    if family in ("zimage", "lumina2"):
        if layer == "attention.qkv":
            kv = (out - hidden) // 2
            return [(f"{block}.{index}.attention.to_{x}", rows)
                    for x, rows in zip("qkv", ((0, hidden), (hidden, kv), (hidden + kv, kv)))]
        return [(f"{block}.{index}.{'attention.to_out.0' if layer == 'attention.out' else layer}", (0, out))]
    if family in ("chroma", "flux2"):
        ours = f"transformer_blocks.{index}" if block == "double_blocks" else f"single_transformer_blocks.{index}"
        if layer in ("img_attn.qkv", "txt_attn.qkv"):
            names = ("to_q", "to_k", "to_v") if layer == "img_attn.qkv" else ("add_q_proj", "add_k_proj", "add_v_proj")
            return [(f"{ours}.attn.{n}", (i * hidden, hidden)) for i, n in enumerate(names)]
        if layer == "linear1":
            if family == "flux2":
                return [(f"{ours}.attn.to_qkv_mlp_proj", (0, out))]
            return [(f"{ours}.attn.to_{x}", (i * hidden, hidden)) for i, x in enumerate("qkv")] + [
                (f"{ours}.proj_mlp", (3 * hidden, out - 3 * hidden))]
        single = {"linear2": "attn.to_out" if family == "flux2" else "proj_out"}
        double = {"img_mlp.0": "ff.linear_in" if family == "flux2" else "ff.net.0.proj",
                  "img_mlp.2": "ff.linear_out" if family == "flux2" else "ff.net.2", "img_attn.proj": "attn.to_out.0"}
        return [(f"{ours}.{(double if block == 'double_blocks' else single)[layer]}", (0, out))]
    if family == "krea2":
        return [(f"transformer_blocks.{index}.{_KREA2[layer]}", (0, out))]
    if family == "qwen":
        return [(path, (0, out))]
    raise ValueError(f"{family} has no diffusers names in Forge Neo's key maps")


def lora_layers(family: str, model, layout: str, units) -> dict[str, tuple[int, int]]:
    """LoRA key prefix -> (out, in) of its factors' product, for ``units`` (module paths) in ``layout``."""
    layers = {}
    for path in units:
        shape = tuple(model.get_submodule(path).weight.shape)
        if layout in ("diffusers", "bare"):
            prefix = "transformer." if layout == "diffusers" else ""
            for name, (_start, rows) in diffusers_names(family, path, shape):
                layers[prefix + name] = (rows, shape[1])
        elif layout == "native":
            layers[f"diffusion_model.{path}"] = shape
        else:
            layers["lora_unet_" + path.replace(".", "_")] = shape
    return layers


def write_family_lora(path: Path, sd_model, family: str, layout: str, units, rank: int = 2, seed: int = 0,
                      scale: float = 0.3, alpha: float | None = None, extra: dict | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    model = sd_model.forge_objects_original.unet.model.diffusion_model
    down_up = ("lora_down", "lora_up") if layout == "kohya" else ("lora_A", "lora_B")
    tensors = {}
    for key, (out, in_features) in lora_layers(family, model, layout, units).items():
        tensors[f"{key}.{down_up[0]}.weight"] = torch.randn(rank, in_features, generator=g) * scale
        tensors[f"{key}.{down_up[1]}.weight"] = torch.randn(out, rank, generator=g) * scale
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    tensors.update(extra or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def write_family_loras(lora_dir: Path, sd_model, family: str, subject: str, style: str) -> None:
    """subj and style in the given layouts on the family's layers (both on some, each alone on others); other
    (kohya) on some of theirs and its own, merged by the WebUI throughout."""
    spec = FAMILIES[family]
    write_family_lora(lora_dir / "subj.safetensors", sd_model, family, subject, spec.subject, seed=1)
    write_family_lora(lora_dir / "style.safetensors", sd_model, family, style, spec.style, rank=3, seed=2,
                      alpha=1.5)
    write_family_lora(lora_dir / "other.safetensors", sd_model, family, "kohya", spec.other, seed=3, alpha=2.0)


def sliced(family: str, layout: str, path: str) -> bool:
    """Whether a LoRA in ``layout`` patches slices of the fused layer ``path`` (not the whole of it)."""
    if layout not in ("diffusers", "bare") or not any(path.endswith(s) for s in FAMILIES[family].fused):
        return False
    return not (family == "flux2" and path.endswith("linear1"))  # Flux.2's diffusers names fuse it too


def decided_layers(family: str, subject: str, style: str) -> set[str]:
    """The layers (``…:part`` for parts of fused layers) both LoRAs touch, as DynFuse names them."""
    spec = FAMILIES[family]
    names = set()
    for path in set(spec.subject) & set(spec.style):
        parts = next((p for s, p in spec.fused.items() if path.endswith(s)), None)
        if parts and (sliced(family, subject, path) or sliced(family, style, path)):
            names.update(f"diffusion_model.{path}:{part}" for part in parts)
        else:
            names.add(f"diffusion_model.{path}")
    return names
