"""The bundled world: base model, scorers and the two LoRA files, loaded from ``assets/``; generation with a
fusion session built the way the hosts build theirs (``read_lora`` → ``LowRankDelta`` → ``FusionSession``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lib_dynfuse.guidance import Guidance, GuidanceParams
from lib_dynfuse.loras.files import deltas_for_model, read_lora
from lib_dynfuse.engine.policies import EngineOptions
from lib_dynfuse.quality import world
from lib_dynfuse.quality.diffusion import PixelDecoder, sample
from lib_dynfuse.quality.scorers import HEADS, Encoder, EncoderPair, Judge
from lib_dynfuse.quality.text import TextEncoder
from lib_dynfuse.quality.unet import UNet2DConditionModel, UNetConfig
from lib_dynfuse.engine.session import FusionSession, LayerTarget

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_FILE = "world_model.safetensors"
SCORERS_FILE = "world_scorers.safetensors"
SUBJECT_FILE = "sks.safetensors"
STYLE_FILE = "zwx.safetensors"
SCORER_SETS = ("guide", "judge")


class AssetsMissing(FileNotFoundError):
    """The world's weights are not there; the message says how to make them."""


# ---- what the LoRAs were trained on, and the references the scorers compare with --------------------------------

def subject_scenes() -> list[world.Scene]:
    """The subject LoRA's training renders (DreamBooth's handful of photos): ``sks`` in the plain style."""
    return [world.Scene(world.SUBJECT, "plain", size, 1000 + i) for i, size in enumerate(("big", "small") * 3)]


def style_scenes() -> list[world.Scene]:
    """The style LoRA's training renders: base objects in the ``zwx`` style."""
    return [world.Scene(obj, world.STYLE, ("big", "small")[i % 2], 2000 + i)
            for i, obj in enumerate(world.BASE_OBJECTS + world.BASE_OBJECTS[:2])]


def training_captions(scenes: Sequence[world.Scene]) -> list[str]:
    return [s.caption(with_size=i % 2 == 0) for i, s in enumerate(scenes)]


# ---- weights on disk ------------------------------------------------------------------------------------------

def save_model(text: TextEncoder, unet: UNet2DConditionModel, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    tensors = {f"text.{k}": v for k, v in text.state_dict().items()}
    tensors |= {f"unet.{k}": v for k, v in unet.state_dict().items()}
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}, os.fspath(path),
              metadata={"unet_config": json.dumps(unet.config.to_dict())})


def save_scorers(sets: dict[str, EncoderPair], path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    tensors = {}
    widths = {}
    for name, pair in sets.items():
        for kind in HEADS:
            encoder = getattr(pair, kind)
            widths[f"{name}.{kind}"] = encoder.features[0].out_channels
            tensors |= {f"{name}.{kind}.{k}": v.detach().contiguous() for k, v in encoder.state_dict().items()}
    save_file(tensors, os.fspath(path), metadata={"widths": json.dumps(widths)})


def _load_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise AssetsMissing(f"DynFuse: the world model file {path} is missing; "
                            "make it with `python -m lib_dynfuse.bench --quality --retrain`")
    with safe_open(os.fspath(path), framework="pt") as f:
        return {k: f.get_tensor(k).float() for k in f.keys()}, dict(f.metadata() or {})


def _part(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_base(folder: str | os.PathLike = ASSETS) -> tuple[TextEncoder, UNet2DConditionModel]:
    """The text encoder and UNet, in fp32, frozen."""
    tensors, metadata = _load_file(Path(folder) / MODEL_FILE)
    config = json.loads(metadata["unet_config"])
    config = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    text, unet = TextEncoder(), UNet2DConditionModel(config)
    text.load_state_dict(_part(tensors, "text."))
    unet.load_state_dict(_part(tensors, "unet."))
    return text.eval().requires_grad_(False), unet.eval().requires_grad_(False)


@dataclass
class World:
    """The bundled world model, its two scorer sets and the paths of its two LoRA files."""

    text: TextEncoder
    unet: UNet2DConditionModel
    scorers: dict[str, EncoderPair]
    subject_lora: Path
    style_lora: Path

    @classmethod
    def load(cls, folder: str | os.PathLike = ASSETS) -> World:
        folder = Path(folder)
        text, unet = load_base(folder)
        tensors, metadata = _load_file(folder / SCORERS_FILE)
        widths = json.loads(metadata["widths"])
        sets = {}
        for name in SCORER_SETS:
            encoders = {}
            for kind in HEADS:
                encoder = Encoder(HEADS[kind], widths[f"{name}.{kind}"])
                encoder.load_state_dict(_part(tensors, f"{name}.{kind}."))
                encoders[kind] = encoder.eval().requires_grad_(False)
            sets[name] = EncoderPair(**encoders)
        for path in (folder / SUBJECT_FILE, folder / STYLE_FILE):
            if not path.is_file():
                raise AssetsMissing(f"DynFuse: the world's LoRA file {path} is missing; "
                                    "make it with `python -m lib_dynfuse.bench --quality --retrain`")
        return cls(text, unet, sets,
                   folder / SUBJECT_FILE, folder / STYLE_FILE)

    # ---- generation ------------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 20, cfg_scale: float = 1.5,
                 session: FusionSession | None = None, guidance: Guidance | None = None) -> Tensor:
        """One image per (prompt, seed) pair, RGB ``[B, 3, 32, 32]`` in [0, 1]. A session is installed for the
        duration of sampling and removed afterwards."""
        with torch.no_grad():
            context, uncond = self.text.encode(list(prompts)), self.text.encode([""] * len(prompts))
        if session is None:
            return sample(self.unet, context, uncond, seeds, steps=steps, cfg_scale=cfg_scale, guidance=guidance)
        with session:
            return sample(self.unet, context, uncond, seeds, steps=steps, cfg_scale=cfg_scale, session=session,
                          guidance=guidance)

    def fusion(self, options: EngineOptions, subject_strength: float = 1.0, style_strength: float = 1.0,
               log=print) -> FusionSession:
        """A fusion session of the subject and style LoRA files on this UNet, at the given tag weights."""
        return FusionSession(lora_targets(self.unet, self.subject_lora, self.style_lora, subject_strength,
                                          style_strength), options, log_errors=log)

    # ---- scoring and guidance ------------------------------------------------------------------------------

    def references(self) -> tuple[Tensor, Tensor]:
        """The subject references (the subject LoRA's training renders) and the style references (the style
        LoRA's), as RGB tensors."""
        return world.render(subject_scenes()), world.render(style_scenes())

    def judge(self) -> Judge:
        subject, style = self.references()
        return Judge(self.scorers["judge"], subject, style)

    def guidance(self, params: GuidanceParams, log=print) -> Guidance:
        """The real guidance correction with this world's guide encoders in the DINO and CLIP slots and the
        pixel-space decoder; references as a user gives them: the subject's images, one style image."""
        subject, style = self.references()
        return Guidance(PixelDecoder(), self.scorers["guide"].scorers(), params,
                        subject_refs=[world.to_pil(image) for image in subject], style_ref=world.to_pil(style[0]),
                        decoder_kind="pixels", log=log)


def lora_targets(unet: nn.Module, subject_path: str | os.PathLike, style_path: str | os.PathLike,
                 subject_strength: float = 1.0, style_strength: float = 1.0) -> list[LayerTarget]:
    """One target per UNet layer either LoRA touches, in the UNet's module order."""
    subject = deltas_for_model(read_lora(subject_path), unet, subject_strength)
    style = deltas_for_model(read_lora(style_path), unet, style_strength)
    return [LayerTarget(name, module, subject.get(name), style.get(name))
            for name, module in unet.named_modules() if name in subject or name in style]
