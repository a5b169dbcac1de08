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

from lib_dynfuse.engine.deltas import LayerGeometry, LowRankDelta
from lib_dynfuse.loras.factors import FactorError, check_factors


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
        """The most common rank of the UNet layers; 0 when there are none."""
        ranks = Counter(layer.rank for layer in self.layers.values()).most_common(1)
        return ranks[0][0] if ranks else 0

    @property
    def family(self) -> str:
        return guess_family(self)

    def require_unet_layers(self) -> None:
        if not self.layers:
            raise LoraFileError(f"{os.path.basename(self.path)} has no UNet layers (text encoder only): "
                                "there is nothing for DynFuse to fuse")


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


def read_lora(path: str | os.PathLike, *, text_encoder: bool = False) -> LoraFile:
    """Read a LoRA ``.safetensors`` file; every failure is a :class:`LoraFileError` with a one-line message.

    Tensor names are matched first and only the factors of UNet layers are loaded, so a checkpoint or another
    large file that is not a LoRA is turned away without reading its data. Every layer's factors are checked
    (:func:`lib_dynfuse.loras.factors.check_factors`): present, fitting each other, finite. ``text_encoder``: read and
    check the text encoder's factors too (they are not kept: the host applies them).
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise LoraFileError(f"LoRA file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            layers, text_encoder_layers = _group(name, list(f.keys()))
            if text_encoder:
                for raw, found in _with_factors(text_encoder_layers).items():
                    _check(name, raw, {role: f.get_tensor(t) for role, t in found.items()}, found)
            tensors = {t: f.get_tensor(t) for found in layers.values() for t in found.values()}
    except LoraFileError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LoraFileError(f"cannot read {name}: damaged or not a .safetensors file ({reason})") from None
    return _lora_file(path, layers, _text_encoder_keys(text_encoder_layers), tensors, metadata)


def parse_lora_tensors(tensors: dict[str, Tensor], *, path: str = "<memory>",
                       metadata: dict[str, str] | None = None) -> LoraFile:
    """:func:`read_lora` for tensors already in memory, keyed by their names in the file."""
    layers, text_encoder = _group(os.path.basename(path), list(tensors))
    return _lora_file(path, layers, _text_encoder_keys(text_encoder), tensors, dict(metadata or {}))


Groups = dict[str, dict[str, str]]  # layer name in the file -> role -> tensor name


def _group(name: str, tensor_names: list[str]) -> tuple[Groups, Groups]:
    """The tensor names of the UNet's layers that hold factors, and of the text encoder's layers;
    :class:`LoraFileError` when there are neither."""
    layers: Groups = {}
    text_encoder: Groups = {}
    for tensor_name in tensor_names:
        for role, pattern in _TENSOR_ROLES:
            match = pattern.match(tensor_name)
            if match:
                raw = match.group(1)
                side = text_encoder if _normalise_key(raw).startswith(_TEXT_ENCODER_PREFIXES) else layers
                side.setdefault(raw, {})[role] = tensor_name
                break
    # A layer with an alpha alone belongs to a network type this reader does not read (LoHa, LoKr).
    layers = _with_factors(layers)
    if not layers and not text_encoder:
        raise LoraFileError(f"{name} is not a LoRA file: it has no lora_down/lora_up or lora_A/lora_B tensors")
    return layers, text_encoder


def _with_factors(groups: Groups) -> Groups:
    return {raw: found for raw, found in groups.items() if found.keys() & {"down", "up", "mid"}}


def _text_encoder_keys(groups: Groups) -> list[str]:
    return sorted({_normalise_key(raw) for raw in groups})


def _lora_file(path: str, layers: Groups, text_encoder: list[str], tensors: dict[str, Tensor],
               metadata: dict[str, str]) -> LoraFile:
    name = os.path.basename(path)
    parsed = {}
    for raw, names in layers.items():
        key = _strip_unet_prefix(_normalise_key(raw))
        found = {role: tensors[t] for role, t in names.items()}
        _check(name, raw, found, names)
        parsed[key] = LoraLayer(key, found["down"], found["up"], found.get("mid"),
                                float(found["alpha"]) if "alpha" in found else None)
    return LoraFile(path, parsed, text_encoder, metadata)


def _check(name: str, raw: str, found: dict[str, Tensor], names: dict[str, str]) -> None:
    """One layer's factors, checked here so that a damaged file is named, not met as a shape error later."""
    try:
        # Tensors are named as in the file, without the layer part the message names already.
        check_factors(raw, found, {role: t[len(raw):].lstrip("._") for role, t in names.items()})
    except FactorError as error:
        raise LoraFileError(f"{name}: {error}; the file is damaged") from None


def _normalise_key(raw: str) -> str:
    key = raw.replace(".processor.", ".").replace(".", "_")
    return re.sub(r"_to_(q|k|v|out)$", lambda m: "_to_out_0" if m.group(1) == "out" else m.group(0), key)


def _strip_unet_prefix(key: str) -> str:
    for prefix in _UNET_PREFIXES:
        if key.startswith(prefix):
            return _strip_unet_prefix(key[len(prefix):])
    return key


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
    lora.require_unet_layers()
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

# Substrings of kohya's ss_base_model_version (sd_v1, sd_v2, sd_v2_v, sdxl_base_v1-0) and of the model spec's
# architecture (stable-diffusion-v1/lora, stable-diffusion-v2-768-v/lora, stable-diffusion-xl-v1-base/lora),
# most specific first.
_METADATA_FAMILIES = (("sdxl", "SDXL"), ("stable-diffusion-xl", "SDXL"), ("sd_v2", "SD2"),
                      ("stable-diffusion-v2", "SD2"), ("sd_v1", "SD1.5"), ("stable-diffusion-v1", "SD1.5"))
# Width of the text context the cross-attention keys and values read: CLIP ViT-L, OpenCLIP ViT-H, both of SDXL's.
_CONTEXT_DIMS = {768: "SD1.5", 1024: "SD2", 2048: "SDXL"}


def guess_family(lora: LoraFile) -> str:
    """SD1.5, SD2, SDXL or unknown: from the trainer's metadata, else from the layers' shapes and names."""
    for entry in ("ss_base_model_version", "modelspec.architecture"):
        value = lora.metadata.get(entry, "").lower()
        for hint, family in _METADATA_FAMILIES:
            if value.startswith(hint):
                return family
    for key, layer in lora.layers.items():
        if key.endswith(("attn2_to_k", "attn2_to_v")):
            return _CONTEXT_DIMS.get(int(layer.down.shape[1]), "unknown")
    keys = set(lora.layers)
    if any(k.startswith(("label_emb", "add_embedding")) for k in keys) or any(
            k.startswith(("lora_te2", "te2")) for k in lora.text_encoder_keys):
        return "SDXL"
    if any(k.startswith(("input_blocks_1_1_", "down_blocks_0_attentions")) for k in keys):
        # Attention at the first level: SD1.5 or SD2, told apart by SD2's linear transformer projections.
        linear = [layer.down.dim() == 2 for k, layer in lora.layers.items() if k.endswith(("proj_in", "proj_out"))]
        return "SD2" if any(linear) else "SD1.5"
    return "unknown"


# Tensor names of the LoRA-like networks the hosts load and this reader does not (LoHa, LoKr, full diff, OFT, IA3).
_OTHER_NETWORKS = re.compile(r"\.(hada_w1_a|lokr_w1|lokr_w1_a|diff|oft_blocks|oft_diag|weight_norm|on_input)$")


def file_problem(path: str | os.PathLike | None, family: str | None = None) -> str | None:
    """Why a host may have loaded no UNet weights from a LoRA file, read from the file itself, as the end of a
    sentence ("it is not a .safetensors file or is damaged (…)"); None when the file looks like a LoRA that fits
    (or is of a kind this reader does not read): the cause is then elsewhere (the name, the host's loader).

    ``family``: the model's ("SD1.5", "SD2", "SDXL"; None for any other), to tell a LoRA of another family."""
    from safetensors import safe_open

    if path is None:
        return None
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        return f"its file {name} is missing"
    try:
        with safe_open(path, framework="pt") as f:
            names = list(f.keys())
    except Exception as error:  # noqa: BLE001 - the reader's own error, whatever the damage
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"{name} is not a .safetensors file or is damaged ({reason})"
    if any(_OTHER_NETWORKS.search(n) for n in names):
        return None
    try:
        lora = read_lora(path)
    except LoraFileError as error:
        text = str(error)
        if "is not a LoRA file" in text:
            return f"{name} holds no LoRA weights (no lora_down/lora_up or lora_A/lora_B tensors)"
        return f"{name} has missing or damaged factors ({text.removeprefix(name + ': ')})"
    if not lora.layers:
        return f"{name} has text-encoder layers only"
    found = lora.family
    if found != "unknown" and found != family:
        model = f"this model is {family}" if family else "this model is of another family"
        return f"{name} is made for {found} and {model}"
    return None
