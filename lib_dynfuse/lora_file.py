"""A standalone reader for LoRA files: kohya (``lora_down``/``lora_up``/``alpha``, LoCon ``lora_mid``) and
diffusers/PEFT (``lora_A``/``lora_B``) layouts, mapped onto the modules of a torch model by name.

Hosts normally hand us parsed weights; this reader serves tests, the benchmark and ``python -m lib_dynfuse
inspect``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field

from torch import Tensor, nn

from lib_dynfuse.deltas import LayerGeometry, LowRankDelta


class LoraFileError(ValueError):
    """A LoRA file that cannot be read or does not fit; the message is one line for the console and the UI."""


@dataclass
class LoraLayer:
    key: str  # the layer's module path with "_" for ".", without the trainer's prefix
    down: Tensor
    up: Tensor
    mid: Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraFile:
    path: str
    layers: dict[str, LoraLayer]
    text_encoder_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    @property
    def rank(self) -> int:
        return Counter(layer.rank for layer in self.layers.values()).most_common(1)[0][0]

    @property
    def family(self) -> str:
        return guess_family(self)


_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder", "te_", "te1_", "te2_")
_UNET_PREFIXES = ("lora_unet_", "base_model_model_", "unet_", "lycoris_")
# (role, pattern) for every tensor name a LoRA file may hold; the group is the layer part of the name.
_TENSOR_ROLES = (
    ("down", re.compile(r"^(.*)\.lora_down\.weight$")),
    ("up", re.compile(r"^(.*)\.lora_up\.weight$")),
    ("mid", re.compile(r"^(.*)\.lora_mid\.weight$")),
    ("alpha", re.compile(r"^(.*)\.alpha$")),
    ("down", re.compile(r"^(.*)\.lora_A(?:\.default)?\.weight$")),
    ("up", re.compile(r"^(.*)\.lora_B(?:\.default)?\.weight$")),
    ("down", re.compile(r"^(.*)_lora\.down\.weight$")),
    ("up", re.compile(r"^(.*)_lora\.up\.weight$")),
)


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA ``.safetensors`` file; every failure is a :class:`LoraFileError` with a one-line message."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise LoraFileError(f"LoRA file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LoraFileError(f"cannot read {name}: damaged or not a .safetensors file ({reason})") from None
    return parse_lora_tensors(tensors, path=path, metadata=metadata)


def parse_lora_tensors(tensors: dict[str, Tensor], *, path: str = "<memory>",
                       metadata: dict[str, str] | None = None) -> LoraFile:
    name = os.path.basename(path)
    parts: dict[str, dict[str, Tensor]] = {}
    for tensor_name, tensor in tensors.items():
        for role, pattern in _TENSOR_ROLES:
            match = pattern.match(tensor_name)
            if match:
                parts.setdefault(match.group(1), {})[role] = tensor
                break
    layers: dict[str, LoraLayer] = {}
    text_encoder: list[str] = []
    for raw_key, found in parts.items():
        key = _normalise_key(raw_key)
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            text_encoder.append(key)
            continue
        if "down" not in found or "up" not in found:
            continue
        layers[_strip_unet_prefix(key)] = _layer(name, _strip_unet_prefix(key), found)
    if not layers and not text_encoder:
        raise LoraFileError(f"{name} is not a LoRA file: it has no lora_down/lora_up or lora_A/lora_B tensors")
    return LoraFile(path, layers, sorted(text_encoder), dict(metadata or {}))


def _normalise_key(raw: str) -> str:
    key = raw.replace(".processor.", ".").replace(".", "_")
    return re.sub(r"_to_(q|k|v|out)$", lambda m: "_to_out_0" if m.group(1) == "out" else m.group(0), key)


def _strip_unet_prefix(key: str) -> str:
    for prefix in _UNET_PREFIXES:
        if key.startswith(prefix):
            return _strip_unet_prefix(key[len(prefix):])
    return key


def _layer(name: str, key: str, found: dict[str, Tensor]) -> LoraLayer:
    down, up, mid = found["down"], found["up"], found.get("mid")
    rank = down.shape[0]
    if up.dim() < 2 or up.shape[1] != rank or (mid is not None and tuple(mid.shape[:2]) != (rank, rank)):
        raise LoraFileError(f"{name}: layer {key} has mismatched factors (down {list(down.shape)}, "
                            f"up {list(up.shape)}); the file is damaged")
    alpha = found.get("alpha")
    return LoraLayer(key, down, up, mid, float(alpha) if alpha is not None else None)


# ---- mapping onto a model -------------------------------------------------------------------------------------

_RESNET_PARTS = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                 "conv_shortcut": "skip_connection"}
_FIXED = {"conv_in": ["input_blocks_0_0"], "conv_out": ["out_2"], "time_embedding_linear_1": ["time_embed_0"],
          "time_embedding_linear_2": ["time_embed_2"], "add_embedding_linear_1": ["label_emb_0_0"],
          "add_embedding_linear_2": ["label_emb_0_2"]}


def ldm_candidates(key: str) -> list[str]:
    """Candidate ldm/sgm layer keys for a diffusers-named layer key (the kohya SD1 convention and PEFT).

    Both SD1.5 and SDXL UNets have three sub-blocks per level, which fixes the index arithmetic; only an
    up-sampler's position depends on whether its level has attention, so both places are offered.
    """
    if key in _FIXED:
        return _FIXED[key]
    m = re.match(r"^(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)$", key)
    if m:
        side, level, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        block = f"input_blocks_{3 * level + j + 1}" if side == "down" else f"output_blocks_{3 * level + j}"
        return [f"{block}_{1 if kind == 'attentions' else 0}_{_resnet_part(kind, rest)}"]
    m = re.match(r"^mid_block_(attentions|resnets)_(\d+)_(.+)$", key)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        index = 1 if kind == "attentions" else (0 if j == 0 else 2)
        return [f"middle_block_{index}_{_resnet_part(kind, rest)}"]
    m = re.match(r"^down_blocks_(\d+)_downsamplers_0_conv$", key)
    if m:
        return [f"input_blocks_{3 * (int(m.group(1)) + 1)}_0_op"]
    m = re.match(r"^up_blocks_(\d+)_upsamplers_0_conv$", key)
    if m:
        block = 3 * int(m.group(1)) + 2
        return [f"output_blocks_{block}_1_conv", f"output_blocks_{block}_2_conv"]
    return []


def _resnet_part(kind: str, rest: str) -> str:
    return _RESNET_PARTS.get(rest, rest) if kind == "resnets" else rest


_MODEL_PREFIXES = ("model_diffusion_model_", "diffusion_model_", "model_", "unet_")


def model_layer_index(model: nn.Module) -> dict[str, str]:
    """Layer key (module path with "_", trainer-style prefixes removed) → module name, for weight layers."""
    index: dict[str, str] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() not in (2, 4):
            continue
        key = name.replace(".", "_")
        index.setdefault(key, name)
        for prefix in _MODEL_PREFIXES:
            if key.startswith(prefix):
                index.setdefault(key[len(prefix):], name)
    return index


def resolve_layers(lora: LoraFile, model: nn.Module) -> dict[str, LoraLayer]:
    """Module name → LoRA layer for every layer of the file found in ``model``."""
    index = model_layer_index(model)
    found: dict[str, LoraLayer] = {}
    for key, layer in lora.layers.items():
        for candidate in [key, *ldm_candidates(key)]:
            if candidate in index:
                found[index[candidate]] = layer
                break
    return found


def deltas_for_model(lora: LoraFile, model: nn.Module, strength: float = 1.0) -> dict[str, LowRankDelta]:
    """Low-rank deltas keyed by module name; :class:`LoraFileError` when the file does not fit ``model``."""
    name = os.path.basename(lora.path)
    layers = resolve_layers(lora, model)
    if not layers:
        raise LoraFileError(f"{name} does not fit this model: none of its {len(lora.layers)} UNet layers exist "
                            f"in it (a {lora.family} LoRA on another model family?)")
    modules = dict(model.named_modules())
    deltas: dict[str, LowRankDelta] = {}
    for module_name, layer in layers.items():
        geometry = LayerGeometry.of(modules[module_name])
        delta = LowRankDelta(layer.down, layer.up, layer.mid, layer.alpha, strength)
        expected_in = geometry.weight_shape[1] * geometry.groups
        if layer.up.shape[0] != geometry.out_channels or layer.down.shape[1] != expected_in:
            raise LoraFileError(
                f"{name} does not fit this model: layer {module_name} has weight {list(geometry.weight_shape)}, "
                f"the LoRA was made for {[layer.up.shape[0], layer.down.shape[1]]} "
                f"(a {lora.family} LoRA on another model family?)")
        deltas[module_name] = delta
    return deltas


# ---- base-model family --------------------------------------------------------------------------------------

_CONTEXT_DIMS = {768: "SD1.5", 2048: "SDXL"}


def guess_family(lora: LoraFile) -> str:
    """SD1.5, SDXL or unknown, from the trainer's metadata, else from the layers' names and shapes."""
    hint = (lora.metadata.get("ss_base_model_version", "") + " " + lora.metadata.get("modelspec.architecture", "")).lower()
    if "xl" in hint:
        return "SDXL"
    if "sd_v1" in hint or "stable-diffusion-v1" in hint:
        return "SD1.5"
    for key, layer in lora.layers.items():
        if key.endswith(("attn2_to_k", "attn2_to_v")):
            family = _CONTEXT_DIMS.get(int(layer.down.shape[1]))
            if family:
                return family
    keys = set(lora.layers)
    if any(k.startswith(("label_emb", "add_embedding")) for k in keys):
        return "SDXL"
    if any(k.startswith(("input_blocks_1_1_", "down_blocks_0_attentions")) for k in keys):
        return "SD1.5"
    if any(k.startswith("lora_te2") or k.startswith("te2") for k in lora.text_encoder_keys):
        return "SDXL"
    return "unknown"

