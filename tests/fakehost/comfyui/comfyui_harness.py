"""Puts the fake ComfyUI on sys.path for one test and builds its models, LoRA files, node runs and samplings.

Not a ComfyUI file: test support only. `comfy_host()` swaps the host's modules in and out of sys.modules (other
fake hosts run in the same process), points `folder_paths` at the test's folder, runs nodes under
`torch.inference_mode()` as ComfyUI's executor does, and unloads every model at the end.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from console_lines import dynfuse_console
from lora_files import kohya_key, lora_tensors, write

ROOT = Path(__file__).resolve().parent
HOST_PACKAGES = ("comfy", "comfy_api", "folder_paths", "nodes")
# lib_dynfuse's ComfyUI modules import the host's at import time: they go in and out with it.
GLUE = ("lib_dynfuse.hosts.comfyui_nodes",)
PROMPT, NEGATIVE = "a portrait of sks person", "blurry"

# Layers each LoRA of the SD-family tests touches (paths under the diffusion model).
SHARED = [
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "input_blocks.1.1.transformer_blocks.0.ff.net.2",
    "input_blocks.1.1.proj_in",
    "input_blocks.1.0.in_layers.2",
]
OTHER_ONLY = ["input_blocks.1.1.transformer_blocks.0.attn2.to_v", "out.2"]
TEXT_LAYERS = ["transformer.text_model.encoder.layers.0.self_attn.q_proj",
               "transformer.text_model.encoder.layers.0.mlp.fc1"]


def _is_host_module(name: str) -> bool:
    return name.split(".")[0] in HOST_PACKAGES or name in GLUE


@dataclass
class Host:
    family: str
    lora_dir: Path
    model: Any            # the checkpoint's ModelPatcher
    clip: Any
    vae: Any
    modules: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        modules = self.__dict__.get("modules", {})
        if name in modules:
            return modules[name]
        raise AttributeError(name)

    def node(self, node_id: str) -> Any:
        nodes = importlib.import_module("lib_dynfuse.hosts.comfyui_nodes")
        return next(cls for cls in nodes.NODES if cls.GET_SCHEMA().node_id == node_id)

    def run(self, node_id: str, **inputs: Any) -> tuple:
        """A DynFuse node's outputs, executed as ComfyUI executes nodes (under inference mode)."""
        with torch.inference_mode():
            return self.node(node_id).execute(**inputs).args

    def pair(self, model: Any = None, clip: Any = None, subject: str = "subject.safetensors",
             style: str = "style.safetensors", subject_strength: float = 0.8, style_strength: float = 1.0,
             **engine: Any) -> tuple:
        return self.run("DynFuseLoraPair", model=model or self.model, clip=clip if clip is not None else self.clip,
                        subject_lora=subject, subject_strength=subject_strength, style_lora=style,
                        style_strength=style_strength, **engine)

    def lora_loader(self, model: Any, clip: Any, name: str, strength: float) -> tuple:
        with torch.inference_mode():
            return self.nodes.LoraLoader().load_lora(model, clip, name, strength, strength)

    def sample(self, model: Any, clip: Any = None, *, steps: int = 3, cfg: float = 5.0, batch: int = 2,
               seed: int = 0, size: int = 8) -> torch.Tensor:
        """KSampler's LATENT samples for an empty latent of ``batch`` images."""
        clip = clip if clip is not None else self.clip
        channels = model.model.latent_format.latent_channels
        with torch.inference_mode():
            positive, negative = clip.encode(PROMPT), clip.encode(NEGATIVE)
            latent = {"samples": torch.zeros(batch, channels, size, size)}
            return self.nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", positive, negative,
                                              latent)[0]["samples"]

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.model.state_dict().items()}


def write_test_loras(host: Host) -> None:
    """subject, style and other LoRA files for the host's family in its lora folder."""
    if host.family == "flux":
        write_flux_loras(host)
        return
    unet = host.model.model
    names = [f"diffusion_model.{p}" for p in SHARED]
    te = host.clip.cond_stage_model

    def te_key(name: str) -> str:
        return "lora_te_" + name.removeprefix("transformer.").replace(".", "_")

    for file, seed, layers in (("subject", 1, names), ("style", 2, names),
                               ("other", 3, names[:2] + [f"diffusion_model.{p}" for p in OTHER_ONLY])):
        tensors = lora_tensors(unet, layers, seed=seed, alpha=2.0, key=kohya_key)
        tensors.update(lora_tensors(te, TEXT_LAYERS, seed=seed + 10, alpha=2.0, key=te_key))
        write(host.lora_dir / f"{file}.safetensors", tensors)


def write_flux_loras(host: Host) -> None:
    """The subject in diffusers names (q, k, v and the MLP input apart: slices of the fused weights), the style in
    BFL/kohya names (the whole fused weights), as the trainers write them."""
    dit = host.model.model.diffusion_model
    hidden, mlp = dit.hidden_size, dit.single_blocks[0].linear1.out_features - 3 * dit.hidden_size
    g = torch.Generator().manual_seed(11)
    subject = {}
    for prefix, out, width in [("transformer.transformer_blocks.0.attn.to_q", hidden, hidden),
                               ("transformer.transformer_blocks.0.attn.to_k", hidden, hidden),
                               ("transformer.transformer_blocks.0.attn.to_v", hidden, hidden),
                               ("transformer.single_transformer_blocks.0.attn.to_q", hidden, hidden),
                               ("transformer.single_transformer_blocks.0.proj_mlp", mlp, hidden)]:
        subject[f"{prefix}.lora_A.weight"] = torch.randn(2, width, generator=g) * 0.5
        subject[f"{prefix}.lora_B.weight"] = torch.randn(out, 2, generator=g) * 0.5
    write(host.lora_dir / "subject.safetensors", subject)
    names = ["diffusion_model.double_blocks.0.img_attn.qkv", "diffusion_model.single_blocks.0.linear1",
             "diffusion_model.double_blocks.0.img_attn.proj"]
    write(host.lora_dir / "style.safetensors", lora_tensors(host.model.model, names, seed=12, alpha=2.0))
    write(host.lora_dir / "other.safetensors", lora_tensors(host.model.model, names[2:], seed=13, alpha=2.0))


@contextlib.contextmanager
def comfy_host(tmp_path: Path, family: str = "sd15", seed: int = 0):
    """The fake ComfyUI with a loaded checkpoint ("sd15", "sdxl" or "flux"), its loras folder in ``tmp_path``."""
    saved = {k: v for k, v in sys.modules.items() if _is_host_module(k)}
    for k in saved:
        del sys.modules[k]
    old_path = list(sys.path)
    sys.path.insert(0, str(ROOT))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with dynfuse_console():
            modules = {name: importlib.import_module(module) for name, module in {
                "model_management": "comfy.model_management", "model_patcher": "comfy.model_patcher",
                "model_base": "comfy.model_base", "ops": "comfy.ops", "sd": "comfy.sd", "lora": "comfy.lora",
                "samplers": "comfy.samplers", "folder_paths": "folder_paths", "nodes": "nodes",
                "patcher_extension": "comfy.patcher_extension"}.items()}
            lora_dir = tmp_path / "loras"
            lora_dir.mkdir(exist_ok=True)
            modules["folder_paths"].folder_names_and_paths["loras"][0][:] = [str(lora_dir)]
            base = modules["model_base"]
            ops = modules["ops"].disable_weight_init
            if family == "flux":
                model = base.Flux(base.TinyFluxDiT(ops, seed=seed))
            else:
                model = (base.SDXL if family == "sdxl" else base.SD15)(base.TinyLdmUNet(ops, seed=seed))
            device = modules["model_management"].get_torch_device()
            patcher = modules["model_patcher"].ModelPatcher(model, load_device=device, offload_device=device)
            channels = model.latent_format.latent_channels
            host = Host(family, lora_dir, patcher, modules["sd"].CLIP(), modules["sd"].VAE(channels), modules)
            try:
                yield host
            finally:
                modules["model_management"].unload_all_models()
                modules["model_management"].interrupt_current_processing(False)
                modules["model_management"].max_batch_rows = None
    finally:
        for k in [k for k in sys.modules if _is_host_module(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
        sys.path[:] = old_path
        torch.set_num_threads(old_threads)
