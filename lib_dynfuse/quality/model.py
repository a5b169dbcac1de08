"""The bundled world: base model, scorers and the two LoRA files, loaded from ``assets/``; generation with a
fusion session built the way the hosts build theirs (``read_lora`` → ``LowRankDelta`` → ``FusionSession``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from lib_dynfuse.guidance import Guidance, GuidanceParams
from lib_dynfuse.loras.files import deltas_for_model, read_lora
from lib_dynfuse.engine.policies import EngineOptions
from lib_dynfuse.quality import world
from lib_dynfuse.quality.diffusion import PixelDecoder, sample
from lib_dynfuse.quality.scorers import KINDS, WORLD_CLASSES, Encoder, EncoderPair, Judge, heads
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


# ---- weights on disk ------------------------------------------------------------------------------------------

def save_model(text: TextEncoder, unet: UNet2DConditionModel, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    tensors = {f"text.{k}": v for k, v in text.state_dict().items()}
    tensors |= {f"unet.{k}": v for k, v in unet.state_dict().items()}
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}, os.fspath(path),
              metadata={"unet_config": json.dumps(unet.config.to_dict())})


def save_scorers(sets: dict[str, EncoderPair], path: str | os.PathLike,
                 classes: dict[str, tuple[str, ...]] = WORLD_CLASSES) -> None:
    from safetensors.torch import save_file

    tensors = {}
    widths = {}
    for name, pair in sets.items():
        for kind in KINDS:
            encoder = getattr(pair, kind)
            widths[f"{name}.{kind}"] = encoder.features[0].out_channels
            tensors |= {f"{name}.{kind}.{k}": v.detach().contiguous() for k, v in encoder.state_dict().items()}
    save_file(tensors, os.fspath(path), metadata={"widths": json.dumps(widths), "classes": json.dumps(classes)})


def load_scorers(path: str | os.PathLike) -> tuple[dict[str, EncoderPair], dict[str, tuple[str, ...]]]:
    """Both scorer sets of a file and the classes they were trained on."""
    tensors, metadata = _load_file(Path(path))
    widths = json.loads(metadata["widths"])
    classes = ({k: tuple(v) for k, v in json.loads(metadata["classes"]).items()} if "classes" in metadata
               else WORLD_CLASSES)
    sets = {}
    for name in SCORER_SETS:
        encoders = {}
        for kind in KINDS:
            encoder = Encoder(heads(kind, classes), widths[f"{name}.{kind}"])
            encoder.load_state_dict(_part(tensors, f"{name}.{kind}."))
            encoders[kind] = encoder.eval().requires_grad_(False)
        sets[name] = EncoderPair(**encoders)
    return sets, classes


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
    """The bundled world model, its two scorer sets (and the classes they know), one pair's two LoRA files."""

    text: TextEncoder
    unet: UNet2DConditionModel
    scorers: dict[str, EncoderPair]
    subject_lora: Path
    style_lora: Path
    classes: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(WORLD_CLASSES))
    pair: str = "heart-zwx"

    @classmethod
    def load(cls, folder: str | os.PathLike = ASSETS) -> World:
        """The world with its original pair (the ``sks`` heart and the ``zwx`` style)."""
        folder = Path(folder)
        text, unet = load_base(folder)
        sets, classes = load_scorers(folder / SCORERS_FILE)
        for path in (folder / SUBJECT_FILE, folder / STYLE_FILE):
            if not path.is_file():
                raise AssetsMissing(f"DynFuse: the world's LoRA file {path} is missing; "
                                    "make it with `python -m lib_dynfuse.bench --quality --retrain`")
        return cls(text, unet, sets, folder / SUBJECT_FILE, folder / STYLE_FILE, classes)

    def with_pair(self, pair: str, subject_lora: str | os.PathLike, style_lora: str | os.PathLike,
                  scorers: tuple[dict[str, EncoderPair], dict[str, tuple[str, ...]]] | None = None) -> World:
        """The same base model with another pair's LoRA files (and scorers that know its subject and style)."""
        sets, classes = scorers or (self.scorers, self.classes)
        return replace(self, subject_lora=Path(subject_lora), style_lora=Path(style_lora), scorers=sets,
                       classes=classes, pair=pair)

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
        from lib_dynfuse.quality.pairs import PAIRS

        pair = PAIRS[self.pair]
        return world.render(pair.subject_scenes()), world.render(pair.style_scenes())

    def judge(self) -> Judge:
        from lib_dynfuse.quality.pairs import PAIRS, SUBJECTS

        subject, style = self.references()
        return Judge(self.scorers["judge"], subject, style, objects=self.classes["object"],
                     subject_shape=SUBJECTS[PAIRS[self.pair].subject].shape)

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
