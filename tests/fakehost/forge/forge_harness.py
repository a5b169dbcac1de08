"""Puts the fake Forge host on sys.path for one test and builds its model, LoRA files and generations.

Not a Forge file: test support only. `forge_host()` swaps the host packages in and out of sys.modules, so
tests of the A1111 fake and of this fake can run in one process.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import sys
from pathlib import Path
from typing import ClassVar

import torch
from console_lines import dynfuse_console
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent
PATHS = [str(ROOT), str(ROOT / "sd_forge_lora")]
HOST_MODULES = ("modules", "backend", "modules_forge", "networks", "network", "extra_networks_lora")
LAYER_TABLE = ROOT.parents[1] / "data" / "forge_sd15_unet_layers.tsv"


def _is_host_module(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in HOST_MODULES)


@contextlib.contextmanager
def forge_host(lora_dir: Path, seed: int = 0, family: str = "sd15", paths: list[str] = PATHS, **dtypes):
    """The fake Forge with a loaded model ("sd15", "sdxl" or "flux"; ``dtypes``: its storage_dtype and
    computation_dtype); yields a namespace of its modules. ``paths``: the host's folders
    (tests/fakehost/neo/neo_harness.py puts the fake Forge Neo's first)."""
    saved = {k: v for k, v in sys.modules.items() if _is_host_module(k)}
    for k in saved:
        del sys.modules[k]
    old_path = list(sys.path)
    sys.path[:0] = paths
    # The model is tiny: one thread is many times faster than several fighting over a loaded CI machine.
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with dynfuse_console():  # what DynFuse prints must be one "DynFuse: " line per print
            shared = importlib.import_module("modules.shared")
            shared.cmd_opts.lora_dir = str(lora_dir)
            shared.state.begin()
            loader = importlib.import_module("backend.loader")
            shared.sd_model = loader.forge_loader(seed, family, **dtypes)
            extra_networks = importlib.import_module("modules.extra_networks")
            extra_networks_lora = importlib.import_module("extra_networks_lora")
            extra_networks.register_extra_network(extra_networks_lora.ExtraNetworkLora())
            yield Host()
    finally:
        for k in [k for k in sys.modules if _is_host_module(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
        sys.path[:] = old_path
        torch.set_num_threads(old_threads)


@contextlib.contextmanager
def tiny_guidance_models(host: Host, monkeypatch, adapter: str = "lib_dynfuse.hosts.forge:ForgeAdapter"):
    """Guidance and scores on the CPU with conftest_guidance's tiny random-weight CLIP and DINO, unloaded after.
    The adapter class is looked up when called: other fixtures re-import lib_dynfuse.hosts."""
    from conftest_guidance import TINY

    from lib_dynfuse.guidance import scorers

    module, name = adapter.split(":")
    host.shared.opts.data.update(dynfuse_device="cpu", dynfuse_precision="fp32")
    monkeypatch.setattr(getattr(importlib.import_module(module), name), "guidance_factories", dict(TINY))
    try:
        yield
    finally:
        scorers.unload()


def record_unconditional_estimates(monkeypatch) -> tuple[list, list]:
    """([the host's unconditional x0 estimate], [the one Guidance.correct was given]) per guided step, filled while
    the host samples; Guidance.correct must run under inference mode on inference tensors."""
    from lib_dynfuse.guidance import Guidance
    from modules import sd_samplers_cfg_denoiser

    host_uncond, given = [], []
    sampling_function = sd_samplers_cfg_denoiser.sampling_function
    correct = Guidance.correct

    def record_host(*args, **kwargs):
        denoised, cond_pred, uncond_pred = sampling_function(*args, **kwargs)
        host_uncond.append(uncond_pred.clone())
        return denoised, cond_pred, uncond_pred

    def record_dynfuse(self, x0, x0_uncond=None, **kwargs):
        assert torch.is_inference_mode_enabled() and x0.is_inference()
        given.append(x0_uncond.clone())
        return correct(self, x0, x0_uncond, **kwargs)

    monkeypatch.setattr(sd_samplers_cfg_denoiser, "sampling_function", record_host)
    monkeypatch.setattr(Guidance, "correct", record_dynfuse)
    return host_uncond, given


class Host:
    """Handles to the fake host's modules, imported from sys.path, so they are the ones Forge code sees."""

    MODULES: ClassVar[dict[str, str]] = {"processing": "modules.processing", "scripts": "modules.scripts", "shared": "modules.shared",
               "script_callbacks": "modules.script_callbacks", "networks": "networks",
               "memory_management": "backend.memory_management", "lora": "backend.patcher.lora",
               "kdiffusion": "modules.sd_samplers_kdiffusion"}

    def __getattr__(self, name: str):
        if name not in self.MODULES:
            raise AttributeError(name)
        return importlib.import_module(self.MODULES[name])

    @property
    def sd_model(self):
        return self.shared.sd_model

    def txt2img(self, prompt: str, runner=None, script_args=(), **kwargs):
        self.shared.state.begin()
        p = self.processing.StableDiffusionProcessingTxt2Img(prompt=prompt, script_runner=runner,
                                                              script_args=script_args, **kwargs)
        return self.processing.process_images(p), p

    def img2img(self, prompt: str, init_images, runner=None, script_args=(), **kwargs):
        self.shared.state.begin()
        p = self.processing.StableDiffusionProcessingImg2Img(prompt=prompt, init_images=init_images,
                                                              script_runner=runner, script_args=script_args,
                                                              **kwargs)
        return self.processing.process_images(p), p


def kohya_keys() -> dict[str, str]:
    """forge weight key -> kohya (diffusers-named, as SD 1.5 LoRAs are) key prefix."""
    with open(LAYER_TABLE, encoding="utf-8") as f:
        rows = csv.DictReader((line for line in f if not line.startswith("#")), delimiter="\t")
        return {row["forge_weight_key"]: row["kohya_key"] for row in rows}


def sdxl_kohya_keys(sd_model) -> dict[str, str]:
    """forge weight key -> kohya key prefix for every Linear and Conv2d of the (SDXL) UNet: kohya names SDXL
    layers by their ldm path (`lora_unet_input_blocks_4_1_proj_in`)."""
    model = sd_model.forge_objects_original.unet.model
    return {f"{name}.weight": "lora_unet_" + name[len("diffusion_model."):].replace(".", "_")
            for name, module in model.named_modules()
            if name.startswith("diffusion_model.") and type(module).__name__ in ("Linear", "Conv2d")}


def lora_keys(sd_model) -> dict[str, str]:
    """forge weight key -> kohya key prefix: SD 1.5 LoRAs use diffusers names, SDXL and Flux ones the model's path."""
    return kohya_keys() if sd_model.is_sd1 else sdxl_kohya_keys(sd_model)


def write_lora(path: Path, sd_model, weight_keys, rank: int = 2, alpha: float | None = 1.0, seed: int = 0,
               scale: float = 0.5, extra: dict | None = None) -> Path:
    """A kohya-format LoRA for the fake UNet touching `weight_keys` (Forge model keys)."""
    g = torch.Generator().manual_seed(seed)
    names = lora_keys(sd_model)
    model = sd_model.forge_objects_original.unet.model
    tensors = {}
    for key in weight_keys:
        module = model.get_submodule(key[: -len(".weight")])
        shape = tuple(module.weight.shape)
        prefix = names[key]
        if len(shape) == 2:
            down, up = torch.randn(rank, shape[1], generator=g), torch.randn(shape[0], rank, generator=g)
        else:
            down = torch.randn(rank, shape[1], shape[2], shape[3], generator=g)
            up = torch.randn(shape[0], rank, 1, 1, generator=g)
        tensors[f"{prefix}.lora_down.weight"] = down * scale
        tensors[f"{prefix}.lora_up.weight"] = up * scale
        if alpha is not None:
            tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    tensors.update(extra or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


# ---- Flux LoRA files ------------------------------------------------------------------------------------------------
def flux_diffusers_layers(sd_model) -> dict[str, tuple[int, int]]:
    """The (out, in) shape of every Linear of the Flux transformer by its diffusers (FluxTransformer2DModel) name, as
    ai-toolkit, SimpleTuner and diffusers' own LoRAs name them: q, k and v apart (to_q, add_k_proj), the single blocks'
    MLP input as proj_mlp."""
    config = sd_model.forge_objects_original.unet.model.diffusion_model.config
    hidden = config["hidden_size"]
    mlp = 4 * hidden
    layers = {}
    for i in range(config["depth"]):
        block = f"transformer_blocks.{i}"
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            layers[f"{block}.attn.{name}"] = (hidden, hidden)
        for ff in ("ff", "ff_context"):
            layers[f"{block}.{ff}.net.0.proj"], layers[f"{block}.{ff}.net.2"] = (mlp, hidden), (hidden, mlp)
        layers[f"{block}.norm1.linear"] = layers[f"{block}.norm1_context.linear"] = (6 * hidden, hidden)
    for i in range(config["depth_single_blocks"]):
        block = f"single_transformer_blocks.{i}"
        for name in ("to_q", "to_k", "to_v"):
            layers[f"{block}.attn.{name}"] = (hidden, hidden)
        layers[f"{block}.proj_mlp"] = (mlp, hidden)
        layers[f"{block}.proj_out"] = (hidden, hidden + mlp)
        layers[f"{block}.norm.linear"] = (3 * hidden, hidden)
    return layers


def write_flux_lora(path: Path, sd_model, layout: str, layers: list[str], rank: int = 2, seed: int = 0,
                    scale: float = 0.3, alpha: float | None = None, extra: dict | None = None) -> Path:
    """A Flux LoRA touching ``layers`` in one of the key layouts users meet:

    * "kohya" (sd-scripts): ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``lora_up`` / ``alpha``,
      layers named by the model's paths (a fused qkv or linear1 is one layer);
    * "bfl": the model's own paths under ``diffusion_model.`` with peft factors, ``….img_attn.qkv.lora_A.weight`` /
      ``lora_B`` (ComfyUI's and BFL's naming);
    * "diffusers": diffusers names under ``transformer.`` with peft factors (``transformer.transformer_blocks.0.attn.
      to_q.lora_A.weight``), q, k, v and the MLP input of a fused layer apart (flux_diffusers_layers).
    """
    g = torch.Generator().manual_seed(seed)
    model = sd_model.forge_objects_original.unet.model.diffusion_model
    shapes = flux_diffusers_layers(sd_model) if layout == "diffusers" else {
        name: tuple(model.get_submodule(name).weight.shape) for name in layers}
    prefix = {"kohya": lambda n: "lora_unet_" + n.replace(".", "_"), "bfl": lambda n: f"diffusion_model.{n}",
              "diffusers": lambda n: f"transformer.{n}"}[layout]
    down_up = ("lora_down", "lora_up") if layout == "kohya" else ("lora_A", "lora_B")
    tensors = {}
    for name in layers:
        out_features, in_features = shapes[name]
        key = prefix(name)
        tensors[f"{key}.{down_up[0]}.weight"] = torch.randn(rank, in_features, generator=g) * scale
        tensors[f"{key}.{down_up[1]}.weight"] = torch.randn(out_features, rank, generator=g) * scale
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    tensors.update(extra or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def flux_qkv(block: str, diffusers: bool = True) -> list[str]:
    """One Flux block's q, k, v LoRA layers ("double 0", "single 1"): diffusers names, or the fused layer."""
    kind, i = block.split()
    if kind == "double":
        return [f"transformer_blocks.{i}.attn.to_{x}" for x in "qkv"] if diffusers else [f"double_blocks.{i}.img_attn.qkv"]
    if diffusers:
        return [f"single_transformer_blocks.{i}.attn.to_{x}" for x in "qkv"] + [f"single_transformer_blocks.{i}.proj_mlp"]
    return [f"single_blocks.{i}.linear1"]


def write_flux_loras(lora_dir: Path, sd_model, subject: str = "diffusers", style: str = "diffusers") -> None:
    """subj and style, in the given layouts, both on the image q, k, v of the first double block and on the single
    blocks' linear1 (q, k, v and the MLP input); subj also on the first block's text q, k, v, style on the second
    block's image q, k, v; other (kohya) on those fused layers and the MLPs, merged by the WebUI throughout."""
    shared = flux_qkv("double 0", subject == "diffusers") + flux_qkv("single 0", subject == "diffusers") + \
        flux_qkv("single 1", subject == "diffusers")
    subject_only = ([f"transformer_blocks.0.attn.add_{x}_proj" for x in "qkv"] if subject == "diffusers"
                    else ["double_blocks.0.txt_attn.qkv"])
    style_layers = flux_qkv("double 0", style == "diffusers") + flux_qkv("single 0", style == "diffusers") + \
        flux_qkv("single 1", style == "diffusers") + flux_qkv("double 1", style == "diffusers")
    write_flux_lora(lora_dir / "subj.safetensors", sd_model, subject, shared + subject_only, seed=1)
    write_flux_lora(lora_dir / "style.safetensors", sd_model, style, style_layers, rank=3, seed=2, alpha=1.5)
    write_flux_lora(lora_dir / "other.safetensors", sd_model, "kohya",
                    ["double_blocks.0.img_attn.qkv", "double_blocks.1.img_mlp.0", "single_blocks.0.linear1",
                     "single_blocks.1.linear2"], seed=3, alpha=2.0)


def crash_at_step_1(host, monkeypatch, inside_unet: bool, layer: str) -> list[int]:
    """Sampling raises at step 1: in the sampler between two UNet calls, or inside the UNet call (in the forward of
    the model's ``layer``, as an out-of-memory error would). Returns the number of hooks on the model when it
    raised."""
    model = host.sd_model.forge_objects_original.unet.model
    real = host.kdiffusion.sample_euler
    hooks_at_error = []

    def raise_now():
        hooks_at_error.append(sum(len(m._forward_hooks) for m in model.modules()))
        raise RuntimeError("out of memory")

    def crashing(model, x, sigmas, extra_args=None, callback=None, disable=None):
        def at_step(d):
            if d["i"] == 1:
                raise_now()
            callback(d)
        return real(model, x, sigmas, extra_args=extra_args, callback=at_step, disable=disable)

    layer_calls = []

    def crashing_layer(module, args):
        layer_calls.append(1)
        if len(layer_calls) == 2:
            raise_now()

    if inside_unet:
        monkeypatch.setattr(model.get_submodule(layer), "_forward_pre_hooks", {0: crashing_layer})
    else:
        monkeypatch.setattr(host.kdiffusion, "sample_euler", crashing)
    return hooks_at_error


def diffusion_model(sd_model) -> torch.nn.Module:
    """The loaded UNet (or FLUX transformer) module, as the host loaded it."""
    return sd_model.forge_objects_original.unet.model


def unet_weights(sd_model) -> dict[str, torch.Tensor]:
    """A copy of every UNet parameter, taken outside inference mode."""
    return {k: v.detach().clone() for k, v in diffusion_model(sd_model).named_parameters()}


LOHA_PROMPT = "a cat <lora:hada:0.7> <lora:style:1> <lora:other:0.5>"  # hada as the subject


def write_loha(sd_model, lora_dir: Path, rank: int = 2) -> list[str]:
    """hada.safetensors: LoHa factors of ``rank`` on the Linear layers among keys 8-13 (which the style LoRA of
    write_test_loras shares from key 10 on), and a bias diff; returns the LoHa layers' module paths."""
    names = kohya_keys()
    g = torch.Generator().manual_seed(7)
    loha, paths = {}, []
    for key in list(names)[8:14]:
        shape = tuple(sd_model.forge_objects_original.unet.model.get_submodule(key[:-7]).weight.shape)
        if len(shape) != 2:
            continue
        prefix = names[key]
        paths.append(key[:-7])
        loha.update({f"{prefix}.hada_w1_a": torch.randn(shape[0], rank, generator=g) * 0.5,
                     f"{prefix}.hada_w1_b": torch.randn(rank, shape[1], generator=g) * 0.5,
                     f"{prefix}.hada_w2_a": torch.randn(shape[0], rank, generator=g) * 0.5,
                     f"{prefix}.hada_w2_b": torch.randn(rank, shape[1], generator=g) * 0.5,
                     f"{prefix}.alpha": torch.tensor(1.0)})
    bias_key = names["diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight"]
    loha[f"{bias_key}.diff_b"] = torch.randn(8, generator=g)
    write_lora(lora_dir / "hada.safetensors", sd_model, [], extra=loha)
    return paths


SUBJECT_KEYS = slice(5, 20)
STYLE_KEYS = slice(10, 30)
OTHER_KEYS = slice(0, 40)
PROMPT = "a dog <lora:subj:0.8> <lora:style:1> <lora:other:0.5>"


def write_test_loras(lora_dir: Path, sd_model) -> dict[str, Path]:
    """subj and style overlap on 10 layers; other touches those and more."""
    keys = list(kohya_keys())
    return {
        "subj": write_lora(lora_dir / "subj.safetensors", sd_model, keys[SUBJECT_KEYS], seed=1),
        "style": write_lora(lora_dir / "style.safetensors", sd_model, keys[STYLE_KEYS], seed=2),
        "other": write_lora(lora_dir / "other.safetensors", sd_model, keys[OTHER_KEYS], seed=3),
    }


# (LoRA, factor, value, what DynFuse's check finds): one value in the first layer's factor of the subject or style
NON_FINITE_FACTORS = [("subj", "up", float("nan"), "1 NaN value"), ("style", "down", float("-inf"), "1 infinite value")]


def write_damaged(lora_dir: Path, sd_model, name: str, role: str, value: float, problem: str) -> tuple[str, str]:
    """write_test_loras's LoRA ``name`` ("subj" or "style") with the ``role`` ("down" or "up") factor of its first
    layer replaced by zeros holding ``value`` at one place; the console line and the infotext note with which
    DynFuse turns itself off for it."""
    keys = list(kohya_keys())[SUBJECT_KEYS if name == "subj" else STYLE_KEYS]
    first = keys[0]
    layer = first.removesuffix(".weight")
    shape = tuple(sd_model.forge_objects_original.unet.model.get_submodule(layer).weight.shape)
    factor = torch.zeros(2, shape[1]) if role == "down" else torch.zeros(shape[0], 2)
    factor[1, 0] = value
    write_lora(lora_dir / f"{name}.safetensors", sd_model, keys, seed=1 if name == "subj" else 2,
               extra={f"{kohya_keys()[first]}.lora_{role}.weight": factor})
    return (f"DynFuse: LoRA '{name}' has a damaged layer (layer {layer}: {role} factor holds {problem} (of "
            f"{factor.numel()})). DynFuse is off for this generation and leaves the LoRAs to the WebUI.",
            f"off: LoRA {name} has non-finite values in layer {layer}")


def dynfuse_lines(capsys) -> list[str]:
    """DynFuse's console lines since the last read."""
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("DynFuse")]


class AdapterScript:
    """An always-on script wired to a host adapter the way the entry script wires it (Script.process ->
    begin_job, process_before_every_sampling -> take_over, postprocess_batch -> score_batch, postprocess ->
    end_job, CFG callbacks)."""

    filename = "dynfuse-test"

    def __init__(self, host: Host, adapter, settings):
        self.adapter = adapter
        self.settings = settings
        self.job = None
        self.takeovers = 0
        host.script_callbacks.on_cfg_denoiser(adapter.on_cfg_denoiser, name="dynfuse")
        host.script_callbacks.on_cfg_after_cfg(adapter.on_cfg_after_cfg, name="dynfuse")

    def process(self, p, *args):
        self.job = self.adapter.begin_job(p, self.settings)

    def process_before_every_sampling(self, p, *args, **kwargs):
        self.takeovers += 1
        if self.job is not None:
            self.adapter.take_over(p, self.job)

    def postprocess_batch(self, p, *args, images=None, batch_number=0, **kwargs):
        self.adapter.score_batch(p, self.job, images, batch_number)

    def postprocess(self, p, processed, *args):
        self.adapter.end_job(p, self.job, processed)


def load_entry_script(extension_root: Path):
    """Execute an extension's scripts/<name>.py the way the WebUI does: a module named after the file, with
    scripts.basedir() pointing at the extension's root. Returns the module."""
    import importlib.util

    scripts = importlib.import_module("modules.scripts")
    scripts.current_basedir = str(extension_root)
    path = extension_root / "scripts" / "dynfuse.py"
    spec = importlib.util.spec_from_file_location(path.name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
