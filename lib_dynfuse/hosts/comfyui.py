"""ComfyUI (0.30): DynFuse as a model patch made with ComfyUI's own mechanisms, no ComfyUI function replaced.

A DynFuse MODEL is a clone of the input ModelPatcher made the way ComfyUI's LoraLoader makes one: both LoRA files go
through ``comfy.sd.load_lora_for_models`` (ComfyUI's key maps, conversions and weight adapters for every family it
knows; the CLIP halves are merged there, as LoraLoader merges them). Then the subject's and style's entries are
taken out of the clone's own patch lists (lib_dynfuse.hosts.patch_store turns them into deltas; patches with an
offset into a fused weight become parts) and ComfyUI merges only the rest. On the clone:

* a ``PatcherInjection``: ComfyUI injects after it patched the weights and ejects before it unpatches or hands the
  model to another clone; the injection puts the fusion's forward hooks on the hooked layers and takes them off;
* an ``APPLY_MODEL`` wrapper: the hooks act only inside a UNet call of this clone's sampling, told the step (the
  call's sigma in ``sample_sigmas``) and the rows (``cond_or_uncond``, in ComfyUI's order); outside one they pass
  the layer's output through, so nothing another clone of the same weights runs is touched;
* ``ON_PRE_RUN`` / ``ON_CLEANUP`` callbacks: each sampling run decides anew (a fresh FusionSession) and leaves its
  decisions for the selection map.

Clones of the DynFuse model (a later LoRA loader, a second sampler) share the one fusion, as ComfyUI shares the
patches' adapters. Guidance is a ``sampler_post_cfg_function`` on a clone. This module and comfyui_nodes.py are the
only code that imports ComfyUI.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lib_dynfuse.engine.decisions import DecisionLog
from lib_dynfuse.engine.layout import BatchLayout, StepClock
from lib_dynfuse.engine.policies import EngineOptions
from lib_dynfuse.engine.session import FusionSession, LayerTarget
from lib_dynfuse.hosts.base import say
from lib_dynfuse.hosts.patch_store import ROLES, LoadRecorder, Taken, split_patches

KEY = "dynfuse"  # the key of DynFuse's injection, wrapper, callbacks and attachment on a ModelPatcher


class DynFuseInputError(ValueError):
    """Input a DynFuse node cannot use; ComfyUI shows the message on the node."""


class ModelFusion:
    """The fusion of one DynFuse MODEL: its layer targets and options, the current sampling run's session, the
    last run's decisions. The callables ComfyUI holds (injection, wrapper, callbacks) are its bound methods."""

    def __init__(self, targets: list[LayerTarget], options: EngineOptions, *, subject: str, style: str,
                 log: Callable[[str], None] = say) -> None:
        self.targets = targets
        self.options = options
        self.names = {"subject": subject, "style": style}
        self.session: FusionSession | None = None
        self.last_log: DecisionLog | None = None
        self.errors: list[str] = []
        self.injected = False
        self._log = log

    # ---- ComfyUI's hooks into the patcher -----------------------------------------------------------
    def inject(self, patcher: Any) -> None:
        self.injected = True
        if self.session is not None:
            self.session.install()

    def eject(self, patcher: Any) -> None:
        self.injected = False
        if self.session is not None:
            self.session.remove()

    def start_run(self, patcher: Any) -> None:
        """ON_PRE_RUN: a new session for a new sampling run (its policy state and log start empty)."""
        self._new_session()

    def end_run(self, patcher: Any) -> None:
        """ON_CLEANUP: the run's decisions stay for the selection map; the hooks stay (inert) until ejected."""
        if self.session is not None:
            self.session.active = False
            self.last_log = self.session.log
            self.errors = list(self.session.errors)

    def apply_model(self, executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None,
                    c_crossattn: Any = None, control: Any = None, transformer_options: dict | None = None,
                    **kwargs: Any) -> torch.Tensor:
        """The APPLY_MODEL wrapper: the hooks fuse during this call only, with its step and rows."""
        options = transformer_options if transformer_options is not None else {}
        session = self.session if self.session is not None else self._new_session()
        session.install()  # a no-op when the injection put them on
        session.set_step(step_clock(options.get("sigmas", t), options.get("sample_sigmas")))
        session.set_layout(BatchLayout.chunks(options.get("cond_or_uncond", []), x.shape[0]))
        session.active = True
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            session.active = False
            if not self.injected:
                session.remove()  # sampled without ComfyUI's load (a caller of apply_model alone)

    def _new_session(self) -> FusionSession:
        previous = self.session
        if previous is not None:
            previous.remove()
        self.session = FusionSession(self.targets, self.options, log_errors=self._log)
        self.session.active = False
        if self.injected:
            self.session.install()
        return self.session

    def share_per_image(self) -> dict[int, float]:
        """image -> share of its layer-step decisions the subject won, in the last sampling run."""
        totals: dict[int, list[float]] = {}
        for decision in (self.last_log.decisions() if self.last_log is not None else []):
            totals.setdefault(decision.unit, []).append(decision.subject_weight)
        return {unit: sum(w) / len(w) for unit, w in sorted(totals.items())}


def step_clock(sigma: Any, sample_sigmas: Any) -> StepClock:
    """The sampler's step: the index of the call's sigma in the run's schedule (``sample_sigmas`` ends with the
    final sigma, so a schedule of n steps has n + 1 entries)."""
    current = float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
    if sample_sigmas is None or len(sample_sigmas) < 2:
        return StepClock(0, 1, current)
    schedule = torch.as_tensor(sample_sigmas).detach().float().cpu().reshape(-1)
    index = int((schedule[:-1] - current).abs().argmin())
    return StepClock(index, len(schedule) - 1, current)


def fusion_of(model: Any) -> ModelFusion | None:
    """The fusion a DynFuse node put on ``model`` (or on the model it was cloned from)."""
    found = model.get_attachment(KEY) if hasattr(model, "get_attachment") else None
    return found if isinstance(found, ModelFusion) else None


# ---- the LoRA pair --------------------------------------------------------------------------------------
def load_pair(model: Any, clip: Any | None, loras: dict[str, tuple[str, float]], options: EngineOptions,
              ) -> tuple[Any, Any | None]:
    """MODEL and CLIP with the subject and style LoRAs (role -> (file path, strength)): the CLIP halves merged as
    LoraLoader merges them, the UNet halves fused by DynFuse at forward time. When the LoRAs cannot be fused (no
    weights for this model, a damaged layer) the console says why and both are merged as LoraLoader merges them.
    Raises DynFuseInputError for a MODEL that already has a pair."""
    import comfy.sd
    import comfy.utils

    if fusion_of(model) is not None:
        raise DynFuseInputError("DynFuse: this MODEL already comes from a DynFuse LoRA pair node; one pair per "
                                "model (connect the model before that node).")
    options.validate()
    recorder = LoadRecorder()  # keyed weakly by patcher: the clones stay referenced in `loaded` until read
    loaded, current_clip = [model], clip
    for role in ROLES:
        path, strength = loras[role]
        tensors = comfy.utils.load_torch_file(path, safe_load=True)
        next_model, current_clip = comfy.sd.load_lora_for_models(loaded[-1], current_clip, tensors, strength,
                                                                 strength)
        recorder.record(loaded[-1], next_model, role)
        loaded.append(next_model)
    merged = loaded[-1]  # both LoRAs in ComfyUI's store: what two LoraLoaders give
    try:
        fusion = _take_over(merged, recorder, loras, options)
    except DynFuseInputError as e:
        say(f"{e} DynFuse is off for this model: both LoRAs are merged as LoraLoader merges them.")
        return merged, current_clip

    import comfy.patcher_extension as ext

    merged.set_injections(KEY, [ext.PatcherInjection(fusion.inject, fusion.eject)])
    merged.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, KEY, fusion.apply_model)
    merged.add_callback_with_key(ext.CallbacksMP.ON_PRE_RUN, KEY, fusion.start_run)
    merged.add_callback_with_key(ext.CallbacksMP.ON_CLEANUP, KEY, fusion.end_run)
    merged.set_attachments(KEY, fusion)
    return merged, current_clip


def _take_over(merged: Any, recorder: LoadRecorder, loras: dict[str, tuple[str, float]],
               options: EngineOptions) -> ModelFusion:
    """The two LoRAs' entries out of the clone's own store, as the fusion's layer targets; the entries no hook can
    add (a norm layer's) stay in the store. Raises DynFuseInputError before the store is changed."""
    files = recorder.files(merged)
    found: dict[str, dict[str, list]] = {}
    for key, entries in merged.patches.items():
        for entry in entries:
            role = recorder.file_of(entry, files)
            if role is not None:
                found.setdefault(role, {}).setdefault(key, []).append(entry)
    missing = [role for role in ROLES if role not in found]
    if missing:
        names = ", ".join(f"{role} LoRA '{_file_stem(loras[role][0])}'" for role in missing)
        raise DynFuseInputError(f"the {names} has no weights for this model (made for another model family, or "
                                "not a LoRA ComfyUI can read).")
    taken = [Taken(role, role, found[role]) for role in ROLES]
    split = split_patches(merged.model, taken, dict.fromkeys(ROLES),
                          lambda key, module: _base_weight(merged, key, module), _merge)
    _check_factors(split.targets, loras)
    for note in split.notes:
        say(note)

    kept = {id(old) for by_key in split.kept.values() for pairs in by_key.values() for old, _ in pairs}
    taken_ids = {id(e) for item in taken for entries in item.patches.values() for e in entries} - kept
    store = {}
    for key, entries in merged.patches.items():
        rest = [e for e in entries if id(e) not in taken_ids]
        if rest:
            store[key] = rest
    merged.patches = store
    merged.patches_uuid = uuid.uuid4()  # ComfyUI merges anew (without the two LoRAs) when it loads this clone
    return ModelFusion(split.targets, options, subject=loras["subject"][0], style=loras["style"][0])


def _base_weight(patcher: Any, key: str, module: torch.nn.Module) -> torch.Tensor:
    # While a LoRA is merged into a weight ComfyUI keeps the original in the backup its clones share.
    saved = patcher.backup.get(key)
    return saved.weight if saved is not None else getattr(module, key.rpartition(".")[2])


def _merge(entries: list, weight: torch.Tensor, key: str) -> torch.Tensor:
    import comfy.lora

    return comfy.lora.calculate_weight(entries, weight, key, intermediate_dtype=torch.float32)


def _check_factors(targets: list[LayerTarget], loras: dict[str, tuple[str, float]]) -> None:
    from lib_dynfuse.loras.factors import FactorError, check_deltas

    for role in ROLES:
        try:
            check_deltas((t.name, delta) for t in targets if (delta := getattr(t, role)) is not None)
        except FactorError as e:
            name = _file_stem(loras[role][0])
            raise DynFuseInputError(f"the {role} LoRA '{name}' has a damaged layer ({e}).") from e


# ---- guidance -----------------------------------------------------------------------------------------
# Families whose latents the guidance decoders read, by the name of ComfyUI's latent format class.
LATENT_FAMILIES = {"SD15": "SD1.5", "SDXL": "SDXL"}
GUIDANCE_FACTORIES: dict[str, Any] = {}  # clip_factory / dino_factory for Guidance.prepare (tests)


def model_family(model: Any) -> str | None:
    """"SD1.5" (SD2 shares its latents) or "SDXL"; None for latents guidance cannot decode (FLUX, SD3, ...)."""
    latent_format = getattr(getattr(model, "model", None), "latent_format", None)
    return LATENT_FAMILIES.get(type(latent_format).__name__)


def pil_images(images: torch.Tensor | None) -> list:
    """ComfyUI IMAGE ``[B, H, W, C]`` in 0..1 -> PIL images."""
    from PIL import Image

    if images is None:
        return []
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a[..., :3]) for a in array]


def image_tensor(image: Any) -> torch.Tensor:
    """A PIL image -> ComfyUI IMAGE ``[1, H, W, 3]``."""
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)


def add_guidance(model: Any, vae: Any | None, subject_refs: Sequence, style_ref: Any | None, params: Any, *,
                 decoder: str, taesd_dir: str | None, scorer_config: Any) -> Any:
    """A clone of ``model`` whose post-CFG function guides the x0 estimate. Raises GuidanceError or
    DynFuseInputError with the user's message."""
    from lib_dynfuse.guidance import Guidance, private_module

    family = model_family(model)
    if family is None:
        raise DynFuseInputError("DynFuse: guidance decodes SD1.5, SD2 and SDXL latents only; this model's are "
                                "none of them.")
    if not subject_refs and style_ref is None:
        raise DynFuseInputError("DynFuse: guidance needs a subject reference image, a style reference image, or "
                                "both.")
    # ComfyUI runs nodes under inference_mode: what guidance differentiates through (its decoder, a private copy
    # of the VAE) must be made of normal tensors; the scorers' models too when this loads them first.
    with torch.inference_mode(False):
        module = None
        if decoder == "vae":
            if vae is None:
                raise DynFuseInputError("DynFuse: decoder 'vae' needs the VAE input connected.")
            module = private_module(vae.first_stage_model).to(scorer_config.torch_device())
        guidance = Guidance.prepare(family=family, params=params, decoder=decoder, taesd_dir=taesd_dir, vae=module,
                                    scorer_config=scorer_config, subject_refs=list(subject_refs),
                                    style_ref=style_ref, log=say, **GUIDANCE_FACTORIES)

    def dynfuse_guidance(args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        options = args.get("model_options", {}).get("transformer_options", {})
        clock = step_clock(args["sigma"], options.get("sample_sigmas"))
        try:
            return guidance.correct(denoised, args.get("uncond_denoised"), progress=clock.progress,
                                    step=clock.index)
        except Exception as error:  # noqa: BLE001 - never stop ComfyUI's sampling
            guidance.active = False
            say(f"guidance failed ({type(error).__name__}: {error}); it is off for the rest of this run.")
            return denoised

    dynfuse_guidance.guidance = guidance  # its losses and state, for whoever holds the model
    guided = model.clone()
    guided.set_model_sampler_post_cfg_function(dynfuse_guidance)
    return guided


# ---- the selection map --------------------------------------------------------------------------------
def selection_outputs(model: Any) -> tuple[torch.Tensor, str]:
    """The last sampling run's selection map as an IMAGE and the subject's share per image as text."""
    from lib_dynfuse.report import selection_map

    fusion = fusion_of(model)
    if fusion is None:
        raise DynFuseInputError("DynFuse: this MODEL has no DynFuse LoRA pair; connect the pair node's MODEL.")
    if fusion.last_log is None or not len(fusion.last_log):
        raise DynFuseInputError("DynFuse: no sampling with this MODEL has finished yet; connect the sampler's "
                                "LATENT so that the map comes after it.")
    names = " + ".join(_file_stem(fusion.names[role]) for role in ROLES)
    image = selection_map(fusion.last_log, title=f"{names}: ")
    shares = fusion.share_per_image()
    text = "; ".join(f"image {unit}: subject {share:.2f}" for unit, share in shares.items())
    if fusion.errors:
        text += "\n" + "\n".join(fusion.errors)
    return image_tensor(image), text


def _file_stem(path: str) -> str:
    import os

    return os.path.splitext(os.path.basename(path))[0]
