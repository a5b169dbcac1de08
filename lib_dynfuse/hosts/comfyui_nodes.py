"""DynFuse's ComfyUI nodes (category "DynFuse"), in ComfyUI's current node API (``comfy_api.latest``: io.ComfyNode,
define_schema, comfy_entrypoint). The repository's root ``__init__.py`` hands ComfyUI ``comfy_entrypoint``; the
work is in lib_dynfuse.hosts.comfyui.

The engine options' inputs are made from the settings' own fields (lib_dynfuse.settings): the same names, ranges,
choices and help as the WebUI's panel and API.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

import folder_paths
from comfy_api.latest import ComfyExtension, io

from lib_dynfuse.engine.policies import EngineOptions
from lib_dynfuse.guidance import GuidanceError, GuidanceParams, ScorerConfig
from lib_dynfuse.hosts import comfyui
from lib_dynfuse.hosts.base import say
from lib_dynfuse.settings import DECODERS, DEFAULTS, FIELDS, STRENGTH_RANGE

CATEGORY = "DynFuse"
ENGINE_FIELDS = [f.name for f in fields(EngineOptions) if f.name in FIELDS]  # the engine options users set
GUIDANCE_FIELDS = {"strength": "guidance_strength", "balance": "guidance_balance", "start": "guidance_start",
                   "end": "guidance_end", "every": "guidance_every"}
FLOAT_STEP = 0.01


def setting_input(name: str, input_id: str | None = None) -> io.Input:
    """A node input for one DynFuse setting: its kind, default, range, choices and help."""
    meta = FIELDS[name].metadata
    default = getattr(DEFAULTS, name)
    common = {"display_name": meta["label"], "tooltip": meta["doc"]}
    input_id = input_id or name
    if meta["choices"]:
        return io.Combo.Input(input_id, options=list(meta["choices"]), default=default, **common)
    if meta["kind"] == "bool":
        return io.Boolean.Input(input_id, default=default, **common)
    low = meta["low"]
    if meta["kind"] == "int":
        return io.Int.Input(input_id, default=default, min=low, max=meta["high"], **common)
    if low is not None and meta["low_open"]:
        low += FLOAT_STEP
    return io.Float.Input(input_id, default=default, min=low, max=meta["high"], step=FLOAT_STEP, **common)


def lora_inputs(role: str) -> list[io.Input]:
    low, high = STRENGTH_RANGE
    return [
        io.Combo.Input(f"{role}_lora", options=folder_paths.get_filename_list("loras"),
                       tooltip=f"The {role} LoRA (models/loras)."),
        io.Float.Input(f"{role}_strength", default=1.0, min=low, max=high, step=FLOAT_STEP,
                       tooltip=f"The {role} LoRA's strength, for the diffusion model and the text encoder."),
    ]


class DynFuseLoraPair(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DynFuseLoraPair",
            display_name="DynFuse LoRA pair",
            category=CATEGORY,
            description="A subject LoRA and a style LoRA, fused per layer, per step and per image at sampling time "
                        "instead of merged. The text-encoder halves merge as LoraLoader merges them.",
            inputs=[io.Model.Input("model"), io.Clip.Input("clip", optional=True), *lora_inputs("subject"),
                    *lora_inputs("style"), *(setting_input(name) for name in ENGINE_FIELDS)],
            outputs=[io.Model.Output(), io.Clip.Output()],
        )

    @classmethod
    def execute(cls, model: Any, subject_lora: str, subject_strength: float, style_lora: str,
                style_strength: float, clip: Any = None, **engine: Any) -> io.NodeOutput:
        loras = {"subject": (folder_paths.get_full_path_or_raise("loras", subject_lora), subject_strength),
                 "style": (folder_paths.get_full_path_or_raise("loras", style_lora), style_strength)}
        options = EngineOptions(**{name: engine.get(name, getattr(DEFAULTS, name)) for name in ENGINE_FIELDS})
        fused_model, fused_clip = comfyui.load_pair(model, clip, loras, options)
        return io.NodeOutput(fused_model, fused_clip)


class DynFuseGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        defaults = ScorerConfig()
        return io.Schema(
            node_id="DynFuseGuidance",
            display_name="DynFuse guidance",
            category=CATEGORY,
            description="Steers each step's x0 estimate (after CFG) toward the subject references (DINO) and the "
                        "style reference (CLIP). SD1.5, SD2 and SDXL.",
            inputs=[
                io.Model.Input("model"),
                io.Vae.Input("vae", optional=True, tooltip="Needed for decoder 'vae' only."),
                io.Image.Input("subject_images", optional=True, tooltip="Subject reference images."),
                io.Image.Input("style_image", optional=True, tooltip="Style reference image."),
                *(setting_input(field, name) for name, field in GUIDANCE_FIELDS.items()),
                io.Combo.Input("decoder", options=list(DECODERS), default=DEFAULTS.guidance_decoder,
                               tooltip=FIELDS["guidance_decoder"].metadata["doc"]),
                io.String.Input("taesd_dir", default="", tooltip="The folder holding taesd_decoder.pth / "
                                "taesdxl_decoder.pth; empty: ComfyUI's models/vae_approx."),
                io.String.Input("clip_weights", default=defaults.clip_weights,
                                tooltip="A local open_clip weights file (offline machines); empty: download."),
                io.String.Input("dino_weights", default=defaults.dino_weights,
                                tooltip="A local DINO weights file (offline machines); empty: download."),
                io.Combo.Input("device", options=["auto", "cpu", "cuda"], default="auto",
                               tooltip="Where the CLIP and DINO models run."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model: Any, strength: float, balance: float, start: float, end: float, every: int,
                decoder: str, taesd_dir: str, clip_weights: str, dino_weights: str, device: str, vae: Any = None,
                subject_images: Any = None, style_image: Any = None) -> io.NodeOutput:
        if not start < end:
            raise comfyui.DynFuseInputError(f"DynFuse: guidance start ({start}) must be before its end ({end}).")
        params = GuidanceParams(strength, balance, start, end, every)
        config = ScorerConfig(clip_weights=clip_weights, dino_weights=dino_weights, device=device)
        style = comfyui.pil_images(style_image)[:1]
        try:
            guided = comfyui.add_guidance(model, vae, comfyui.pil_images(subject_images), style[0] if style else None,
                                          params, decoder=decoder, taesd_dir=taesd_dir or _vae_approx_dir(),
                                          scorer_config=config)
        except GuidanceError as e:
            say(f"{e} The model goes on without guidance.")
            return io.NodeOutput(model)
        return io.NodeOutput(guided)


def _vae_approx_dir() -> str | None:
    folders = folder_paths.get_folder_paths("vae_approx")
    return next((f for f in folders if os.path.isdir(f)), None)


class DynFuseSelectionMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DynFuseSelectionMap",
            display_name="DynFuse selection map",
            category=CATEGORY,
            description="Which LoRA each layer took at each step in the last sampling with this model (orange: "
                        "subject, blue: style), and the subject's share per image.",
            inputs=[io.Model.Input("model", tooltip="The DynFuse LoRA pair's MODEL (or a model made from it)."),
                    io.Latent.Input("samples", tooltip="The sampler's output, so that the map comes after it.")],
            outputs=[io.Image.Output(display_name="map"), io.String.Output(display_name="share")],
        )

    @classmethod
    def execute(cls, model: Any, samples: Any) -> io.NodeOutput:
        image, text = comfyui.selection_outputs(model)
        return io.NodeOutput(image, text)

    @classmethod
    def fingerprint_inputs(cls, model: Any, samples: Any) -> Any:
        return float("nan")  # the decisions live on the model, not in the inputs: never reuse a cached map


NODES: list[type[io.ComfyNode]] = [DynFuseLoraPair, DynFuseGuidance, DynFuseSelectionMap]


class DynFuseExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> DynFuseExtension:
    return DynFuseExtension()
