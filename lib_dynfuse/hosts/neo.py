"""Stable Diffusion WebUI Forge Neo (Haoming02's `neo` branch, release 2.2x): its LoRA store for the Forge-family
takeover (lib_dynfuse.hosts.forge_family).

Neo's UNet patcher is a port of ComfyUI's ModelPatcher. It keeps the patches of every LoRA together per model
weight, `unet.patches[model_key] = [(strength, adapter, strength_model, offset, function, online_mode), ...]`, with
no file name, and merges them when the patcher loads only if its `patches_uuid` differs from the one merged last
(`ModelPatcher.partially_load`). Hence:

* which file an entry came from: `networks.load_lora_for_models` (called once per file, with the file name) is
  wrapped by a LoadRecorder; the payloads (adapter objects) it added are what every later clone's entries hold;
* the clone's lists are its own copies; DynFuse gives the clone new lists without the subject's and style's entries
  (the patches it cannot fuse stay where they were, at the strength override if one is set);
* the clone gets a new `patches_uuid`, derived from the source's and from what was taken: Neo then restores the
  original weights and merges the other LoRAs once, and merges nothing again while the same LoRAs and settings come
  back (the next batch, the hires pass, the next generation). Without a new uuid Neo would keep the weights it
  merged before, the two LoRAs included, and the hooks would add them a second time;
* dense deltas come from Neo's merge on the original weight, which Neo keeps in `unet.backup` while a LoRA is
  merged into it;
* every family Neo loads keeps its LoRAs as weight patches in that store (SD 1.5, SDXL, FLUX.1, Chroma, Flux.2,
  Z-Image, Lumina 2, Qwen-Image, Wan, Krea 2, ...), fused layers as patches on slices of them, except two kinds of
  model, refused with the reason (`model_refusal`): a Nunchaku SVDQ model (Neo hands it the file names, and
  Nunchaku composes the LoRAs into its quantised low-rank weights) and an int8 model (its patcher keeps online LoRAs
  apart from the store and merges the rest into rotated, requantised weights).
"""

from __future__ import annotations

import uuid
from typing import Any

import torch

from lib_dynfuse.hosts.base import Job, turn_off
from lib_dynfuse.hosts.forge_family import ForgeFamilyAdapter, role_of_file
from lib_dynfuse.hosts.patch_store import LoadRecorder, Split, Taken

LOADER_CHANGED = ("Forge Neo's LoRA loader (networks.load_lora_for_models with a file name) was not found; DynFuse "
                  "cannot tell which patches belong to which LoRA file.")
# One recorder per process: the WebUI's `networks` module outlives a Reload UI, and so do its records.
RECORDER = LoadRecorder()


def watch_lora_loads() -> bool:
    """Wrap Neo's per-file LoRA loader (idempotent); False when it is not there to wrap."""
    try:
        import networks
    except ImportError:
        return False
    return RECORDER.install(networks)


# huggingface_repo of Neo's model configs (huggingface_guess/model_list.py), lower case -> the family's name; the
# first match wins.
FAMILY_NAMES = (("flux.2", "Flux.2"), ("flux", "FLUX.1"), ("chroma", "Chroma"), ("z-image", "Z-Image"),
                ("lumina", "Lumina 2"), ("qwen", "Qwen-Image"), ("wan", "Wan"), ("krea-2", "Krea 2"),
                ("anima", "Anima"), ("ernie", "ERNIE-Image"), ("mugen", "Mugen"), ("pid", "PiD"),
                ("xl", "SDXL"), ("stable-diffusion-v1", "SD 1.5"))


def family_name(unet: Any) -> str:
    """The model family Neo loaded, by its config's repository name ("" when unknown)."""
    repo = str(getattr(getattr(getattr(unet, "model", None), "config", None), "huggingface_repo", "") or "").lower()
    return next((name for key, name in FAMILY_NAMES if key in repo), "")


def model_refusal(unet: Any) -> str | None:
    """Why the loaded model keeps its LoRAs where DynFuse cannot take them over (naming the family), else None."""
    model = " ".join(("this", family_name(unet), "model")).replace("  ", " ")
    diffusion_model = getattr(getattr(unet, "model", None), "diffusion_model", None)
    try:
        from backend.args import dynamic_args

        nunchaku = bool(getattr(dynamic_args, "nunchaku", False))
    except ImportError:
        nunchaku = False
    if nunchaku or isinstance(getattr(diffusion_model, "loras", None), list):
        return (f"Forge Neo runs {model} with Nunchaku (SVDQ), which composes LoRAs into its quantised "
                "weights instead of weight patches DynFuse can take over.")
    if type(unet).__name__ == "INT8ModelPatcher" or (isinstance(diffusion_model, torch.nn.Module) and any(
            getattr(m, "_is_quantized", False) for m in diffusion_model.modules())):
        return (f"Forge Neo runs {model} in int8, whose patcher keeps online LoRAs out of its patch store "
                "and merges the others into rotated, requantised weights; DynFuse cannot take them over.")
    return None


class NeoAdapter(ForgeFamilyAdapter):
    name = "forge-neo"
    host_label = "Forge Neo"
    store = "per-weight"

    def __init__(self) -> None:
        super().__init__()
        self.asked_reload = False
        watch_lora_loads()  # before the first generation loads a LoRA

    def unsupported_reason(self, p: Any) -> str | None:
        if not watch_lora_loads():
            return LOADER_CHANGED
        unet = _unet(p)
        return (model_refusal(unet) if unet is not None else None) or super().unsupported_reason(p)

    def take_over(self, p: Any, job: Job) -> None:
        unet = _unet(p)
        refused = None if job.failed or unet is None else model_refusal(unet)
        if refused is not None:  # a model loaded after the job began
            turn_off(p, job, refused, f"off: {refused}")
            return
        super().take_over(p, job)

    def prepare(self, p: Any, job: Job) -> None:
        super().prepare(p, job)
        engine = getattr(p, "sd_model", None)
        cached = getattr(getattr(engine, "forge_objects_after_applying_lora", None), "unet", None)
        if not self.asked_reload and getattr(cached, "patches", None) and not RECORDER.knows(cached):
            # Loaded before DynFuse watched the loader (installed while the WebUI ran): Neo reuses them while the
            # prompt's LoRAs stay the same, so ask it once to load them again, now watched. (Once: LoRAs another
            # extension loads past the loader would be loaded again for nothing at every generation.)
            self.asked_reload = True
            engine.current_lora_hash = None

    def take_patches(self, unet: Any, job: Job) -> list[Taken]:
        role_of, origin = role_of_file(job), RECORDER.files(unet)
        found: dict[tuple[str, str], dict[str, list]] = {}
        for key, entries in unet.patches.items():
            for entry in entries:
                stored = RECORDER.file_of(entry, origin)
                role = role_of(stored)
                if role is not None:
                    found.setdefault((role, stored), {}).setdefault(key, []).append(entry)
        return [Taken(role, stored, patches) for (role, stored), patches in found.items()]

    def keep_with_host(self, unet: Any, job: Job, taken: list[Taken], split: Split) -> None:
        taken_ids = {id(e) for item in taken for entries in item.patches.values() for e in entries}
        replacements = split.replacements()
        store = {}
        for key, entries in unet.patches.items():
            # A kept patch stays where it was: one with strength_model != 1 scales what is merged before it.
            kept = []
            for entry in entries:
                if id(entry) not in taken_ids:
                    kept.append(entry)
                elif id(entry) in replacements:
                    kept.append(replacements[id(entry)])
            if kept:
                store[key] = kept
        source_uuid = unet.patches_uuid
        unet.patches = store
        unet.patches_uuid = derived_uuid(source_uuid, taken, split)

    def base_weight(self, unet: Any, key: str, module: torch.nn.Module) -> torch.Tensor:
        saved = unet.backup.get(key)
        return saved.weight if saved is not None else getattr(module, key.rpartition(".")[2])


def _unet(p: Any) -> Any:
    return getattr(getattr(getattr(p, "sd_model", None), "forge_objects", None), "unet", None)


def derived_uuid(source: Any, taken: list[Taken], split: Split) -> uuid.UUID:
    """The same value for the same source store, the same files taken and the same entries kept (at the same
    strengths): Neo merges once per change of what it merges, and never keeps a merge made with the subject and
    style in it."""
    namespace = source if isinstance(source, uuid.UUID) else uuid.uuid5(uuid.NAMESPACE_OID, repr(source))
    files = sorted((item.role, str(item.source)) for item in taken)
    kept = sorted((str(stored), key, tuple(float(new[0]) for _old, new in pairs))
                  for stored, by_key in split.kept.items() for key, pairs in by_key.items())
    return uuid.uuid5(namespace, repr(("dynfuse", files, kept)))
