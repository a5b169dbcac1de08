"""What Forge and Forge Neo share: take the subject and style LoRAs over from the WebUI's weight merge before every
sampling run and fuse them per layer and step with forward hooks.

Both keep a LoRA as weight patches on the UNet patcher and merge them into the model when the patcher is loaded for
sampling. So, before every sampling run (`process_before_every_sampling`; Forge calls it three times for txt2img
with hires fix, Forge Neo twice):

1. clone the current UNet patcher and take the two LoRAs' entries out of the clone's own store (entries and the
   lists and dicts shared with the WebUI's cached patchers are never edited), then assign the clone back: the WebUI
   restores the original weights and re-merges only the other LoRAs. How a store files its entries and how the
   WebUI notices the change is the host adapter's part (forge.py, neo.py);
2. turn each taken patch into a delta (lib_dynfuse.hosts.patch_store) on the module found by its path,
   `unet.model.get_submodule(path)`, and check the deltas' factors: a damaged LoRA turns DynFuse off before the
   clone's store is rewritten, and the WebUI samples with the patcher it had;
3. open a FusionSession whose hooks add the chosen delta to each layer's output. DynFuse's `model_function_wrapper`
   puts the hooks on the shared model around each UNet call and takes them off in its `finally`, and tells the
   session the call's row layout from the WebUI's `cond_or_uncond` list. Should another extension take the wrapper
   slot later, the hooks go on for the whole sampling run instead (on_cfg_denoiser) and come off at the next
   takeover, at postprocess or at the start of the next job.

Guidance corrects the x0 estimate the WebUI hands to the after-CFG callback; the unconditional estimate that sizes
the step comes from a `sampler_post_cfg_function` on the same clone. Sampling runs under inference mode with
inference-tensor weights, so everything guidance differentiates is built in `process()` outside it, and decoder
"vae" is a private copy of the checkpoint's VAE, never the WebUI's own.
"""

from __future__ import annotations

import abc
import functools
import os
from collections.abc import Callable
from typing import Any

import torch

from lib_dynfuse.hosts import options
from lib_dynfuse.hosts.base import HostAdapter, Job, absent_role, add_note, say, say_once, turn_off
from lib_dynfuse.hosts.patch_store import ROLES, Split, Taken, same_file, split_patches

# How a UNet patcher keeps its LoRAs, for the message that refuses a store an adapter cannot read.
STORES = {
    "per-file": "per LoRA file (Forge main's lora_patches)",
    "per-weight": "per model weight under a patches_uuid (Forge Neo's store)",
    "ldm_patched": "in the ldm_patched store of old Forge and Forge Classic",
}


def store_kind(unet: Any) -> str | None:
    """Which of STORES the patcher has (None: none DynFuse knows)."""
    if hasattr(unet, "lora_patches"):
        return "per-file"
    if hasattr(unet, "patches") and hasattr(unet, "patches_uuid"):
        return "per-weight"
    if hasattr(unet, "patches"):
        return "ldm_patched"
    return None


class ForgeFamilyAdapter(HostAdapter):
    """The takeover for a WebUI with Forge's `backend/` sampler; subclasses read and write its LoRA store."""

    # forge_objects is reset from the WebUI's cached patchers before each sampling run, after every other hook.
    takeover_at = "process_before_every_sampling"
    host_label = "Forge"      # the WebUI's name in messages
    store = "per-file"        # the STORES kind this adapter reads

    # ---- the store (per host) -------------------------------------------------------------------
    @abc.abstractmethod
    def take_patches(self, unet: Any, job: Job) -> list[Taken]:
        """The subject's and style's entries in the clone's store (not yet removed)."""

    @abc.abstractmethod
    def keep_with_host(self, unet: Any, job: Job, taken: list[Taken], split: Split) -> None:
        """Rewrite the clone's store: without the taken entries, with ``split.kept`` in their place, so that the
        WebUI merges exactly the rest when it loads the clone."""

    @abc.abstractmethod
    def base_weight(self, unet: Any, key: str, module: torch.nn.Module) -> torch.Tensor:
        """The weight ``key`` had before the WebUI merged any LoRA into it."""

    def merge(self, entries: list, weight: torch.Tensor, key: str) -> torch.Tensor:
        """The WebUI's own merge of stored entries into a float32 weight (in place on some hosts: callers pass a
        tensor of their own)."""
        from backend.patcher.lora import merge_lora_to_weight

        return merge_lora_to_weight(entries, weight, key, computation_dtype=torch.float32)

    def store_problem(self, unet: Any) -> str | None:
        found = store_kind(unet)
        if found == self.store:
            return None
        how = STORES.get(found, "in no patch store DynFuse knows")
        return (f"this WebUI's UNet keeps its LoRAs {how}, where DynFuse's {self.host_label} support expects them "
                f"{STORES[self.store]}; DynFuse cannot take them over here.")

    # ---- checks ---------------------------------------------------------------------------------
    def unsupported_reason(self, p: Any) -> str | None:
        unet = _forge_unet(p)
        if unet is None:
            return None  # the checkpoint loads lazily; take_over checks again
        return self.store_problem(unet)

    # ---- guidance inputs ------------------------------------------------------------------------
    def model_family(self, p: Any) -> str | None:
        model = getattr(p, "sd_model", None)
        for flag, family in (("is_sdxl", "SDXL"), ("is_sd2", "SD2"), ("is_sd1", "SD1.5")):
            if getattr(model, flag, False):
                return family
        from lib_dynfuse.guidance.decoders import latent_family

        # FLUX.1, Chroma, Z-Image, Lumina 2: the FLUX autoencoder's latent; None for the rest (Flux.2, Qwen-Image,
        # Wan, Krea 2: latents no guidance decoder reads).
        return latent_family(getattr(getattr(model, "model_config", None), "latent_format", None))

    def taesd_dir(self) -> str | None:
        from modules import paths_internal

        return os.path.join(paths_internal.models_path, "VAE-taesd")  # as the WebUI's own sd_vae_taesd

    def guidance_vae(self, p: Any) -> Any | None:
        """A private, gradient-capable copy of the model's VAE on the guidance device: the WebUI's own is made of
        inference tensors and belongs to its memory manager, which must not move it in the middle of sampling."""
        objects = getattr(getattr(p, "sd_model", None), "forge_objects", None)
        vae = getattr(getattr(objects, "vae", None), "first_stage_model", None)
        if vae is None:
            return None
        from lib_dynfuse.guidance import private_module

        with torch.inference_mode(False):
            return private_module(vae).to(options.scorer_config().torch_device())

    def lora_path(self, name: str) -> str | None:
        return lora_file(name)

    # ---- the takeover ---------------------------------------------------------------------------
    def take_over(self, p: Any, job: Job) -> None:
        if job.failed:
            return
        try:
            self._close_session(job)
            engine = p.sd_model
            current = engine.forge_objects.unet
            problem = self.store_problem(current)
            if problem:
                turn_off(p, job, problem, "off: unsupported WebUI")
                return
            # Forge's first hires call sees the clone made for the first pass; start again from what it replaced.
            source = job.host["source"] if current is job.host.get("clone") else current
            unet = source.clone()
            taken = self.take_patches(unet, job)
            missing = [role for role in ROLES if not any(item.role == role for item in taken)]
            if missing:
                turn_off(p, job, self._not_loaded(p, job, missing), "off: LoRA has no UNet weights")
                return
            split = split_patches(unet.model, taken, strength_overrides(job),
                                  lambda key, module: self.base_weight(unet, key, module), self.merge,
                                  absent_role(job.settings))
            # Before the clone's store is rewritten or handed over: on a damaged LoRA the WebUI keeps the patcher
            # it had (Neo's patches_uuid included) and makes the image as it would without DynFuse.
            if self.damaged_factors(p, job, split.targets):
                return
            for note in split.notes:
                say_once(job, note)
                add_note(p, note)
            self.keep_with_host(unet, job, taken, split)
            self._start_session(p, job, engine, source, unet, split.targets)
        except Exception as e:  # noqa: BLE001 - never stop the host's generation
            _restore_unet(p, job)
            self.fail(p, "could not take over the LoRAs", e)

    def _not_loaded(self, p: Any, job: Job, missing: list[str]) -> str:
        """What to say of the LoRAs (roles) the WebUI put no UNet weights of in the store: the cause their files
        show; when one file shows one, that LoRA alone (the WebUI stops loading the prompt's LoRAs at a file it
        cannot read, so the others may be missing too)."""
        causes = {role: self.file_problem(p, getattr(job, role).name) for role in missing}
        if any(causes.values()):
            return " ".join(f"the {role} '{getattr(job, role).name}' LoRA has no UNet weights loaded by "
                            f"{self.host_label}: {cause}." for role, cause in causes.items() if cause)
        names = ", ".join(f"{role} '{getattr(job, role).name}'" for role in missing)
        return (f"the {names} LoRA has no UNet weights loaded by {self.host_label} (unknown name, or made for "
                "another model family).")

    def _start_session(self, p: Any, job: Job, engine: Any, source: Any, unet: Any, targets: list) -> None:
        """The layer targets -> the job's FusionSession, its hooks wired into the clone, the clone handed over."""
        from lib_dynfuse.engine.session import FusionSession

        session = FusionSession(targets, options.engine_options(job.settings), log_errors=say)
        # The factors go to the device at the first UNet call, after the WebUI has decided how much of the UNet
        # fits: ask it to leave room for them (it offloads more weights when memory is short).
        unet.add_extra_preserved_memory_during_sampling(_device_bytes(targets, unet.model.computation_dtype))
        # Tried once here, where a failure still gives the WebUI every LoRA back; from here on the hooks are on the
        # shared model only inside each UNet call (the wrapper below), or for the pass as a fallback.
        session.install()
        session.remove()
        _install_unet_wrapper(unet, session, job,
                              on_error=lambda e: self.fail(p, "could not put the hooks on the UNet", e))
        if job.guidance is not None:
            _install_uncond_tap(unet, job)
        engine.forge_objects.unet = unet
        job.host.update(clone=unet, source=source, engine=engine)
        job.session = session
        job.add_pass(p, session.log)

    # ---- CFG callbacks --------------------------------------------------------------------------
    def on_cfg_denoiser(self, params: Any) -> None:
        job = self.job
        if job is None or job.failed or (job.session is None and job.guidance is None):
            return
        session = job.session
        from lib_dynfuse.engine.layout import StepClock

        try:
            denoiser = getattr(params, "denoiser", None)
            # denoiser.step is the sampler's true index; params.sampling_step lags by one on Forge.
            index = int(getattr(denoiser, "step", params.sampling_step))
            total = int(getattr(denoiser, "total_steps", None) or params.total_sampling_steps or 1)
            sigma = params.sigma
            sigma = float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else sigma
            clock = StepClock(index, total, sigma)
            job.host["clock"] = clock
            job.host["denoiser"] = denoiser  # AfterCFGCallbackParams carries no reference to it
            tap = job.host.get("uncond_x0")
            if tap:
                tap[0] = None  # a step whose post-CFG functions do not run must not reuse the last estimate
            if session is not None:
                session.set_step(clock)
                if not session.installed and not _wrapper_in_place(job):
                    session.install()  # until release(): at the next takeover, postprocess or the next job
        except Exception as e:  # noqa: BLE001
            self.fail(getattr(getattr(params, "denoiser", None), "p", None), "could not read the sampler step", e)
            return
        calls = job.host.get("wrapper_calls", [0])
        if session is not None and index > 0 and calls[0] == 0:
            say_once(job, f"another extension replaced {self.host_label}'s UNet function wrapper after DynFuse set "
                          "it; cond and uncond rows of an image now decide separately.")

    def uncond_estimate(self, job: Job) -> Any | None:
        # The WebUI's after-CFG estimate is x0-space; the unconditional one comes from the post-CFG function.
        return (job.host.get("uncond_x0") or [None])[0]

    # ---- lifetime -------------------------------------------------------------------------------
    def release(self, job: Job, keep_job: bool = False) -> None:
        self._close_session(job)
        # The WebUI gets the patcher it had back: DynFuse's clone (whose store lacks the two LoRAs) is not left in
        # forge_objects until the next generation resets it, and dies with the job.
        objects = getattr(job.host.get("engine"), "forge_objects", None)
        if objects is not None and objects.unet is job.host.get("clone"):
            objects.unet = job.host["source"]
        for key in ("clone", "source", "engine", "wrapper", "wrapper_session"):
            job.host.pop(key, None)
        tap = job.host.pop("uncond_x0", None)
        if tap is not None:
            tap.clear()  # the tap in the clone's model_options keeps nothing from now on

    def _close_session(self, job: Job) -> None:
        session = job.session
        holder = job.host.get("wrapper_session")
        if holder is not None:
            # The wrapper in the WebUI's patcher passes straight through from now on, and keeps neither the session
            # nor the error handler (which holds p, and p's infotext holds the job).
            holder[:] = [None, None]
        if session is not None:
            session.remove()
            job.last_log = session.log
            job.session = None

    def remove_leftovers(self) -> None:
        try:
            from lib_dynfuse.engine.session import remove_leftover_hooks
            from modules import shared

            engine = shared.sd_model
            objects = getattr(engine, "forge_objects_original", None) or getattr(engine, "forge_objects", None)
            model = getattr(getattr(objects, "unet", None), "model", None)
            if isinstance(model, torch.nn.Module):
                removed = remove_leftover_hooks(model)
                if removed:
                    say(f"removed {removed} hooks left by an interrupted generation")
        except Exception as e:  # noqa: BLE001
            say(f"could not check for leftover hooks: {e}")


def strength_overrides(job: Job) -> dict[str, float | None]:
    """role -> the strength the settings give that LoRA instead of its tag's (None: the tag's)."""
    return {"subject": job.settings.subject_strength, "style": job.settings.style_strength}


def _device_bytes(targets: list, dtype: torch.dtype) -> int:
    """What the hooks' deltas take once cast to the UNet's computation dtype (the hooks cache them per device)."""
    size = torch.empty((), dtype=dtype).element_size()
    deltas = [d for t in targets for d in (t.subject, t.style) if d is not None]
    return size * sum(v.numel() for d in deltas for v in vars(d).values() if isinstance(v, torch.Tensor))


# ---- the WebUI's sampler -----------------------------------------------------------------------------
def _install_unet_wrapper(unet: Any, session: Any, job: Job, on_error: Callable[[Exception], None]) -> None:
    """Put the session's hooks on the shared model for each UNet call only, removed in its `finally` (an exception
    or interrupt leaves nothing on the model), and tell the session the call's rows: the WebUI batches one chunk of
    B rows per cond/uncond entry (`cond_or_uncond`, 0 = cond), uncond first, split over several calls when memory
    is short.

    A closure, not an object: clones deep-copy model_options, and functions are copied by reference. The slot holds
    one wrapper, so an earlier one is chained (inside the hooks); an extension that replaces this one later leaves
    the hooks to the per-pass fallback in on_cfg_denoiser."""
    from lib_dynfuse.engine.layout import BatchLayout

    previous = unet.model_options.get("model_function_wrapper")
    holder = [session, on_error]  # emptied when the session closes
    calls = job.host["wrapper_calls"] = [0]
    job.host["wrapper_session"] = holder

    def call(apply_model: Callable, args: dict) -> torch.Tensor:
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def dynfuse_unet_wrapper(apply_model: Callable, args: dict) -> torch.Tensor:
        active, failed = holder
        if active is None:
            return call(apply_model, args)
        calls[0] += 1
        active.set_layout(BatchLayout.chunks(args["cond_or_uncond"], args["input"].shape[0]))
        if active.installed:  # the per-pass fallback put them on
            return call(apply_model, args)
        try:
            active.install()
        except Exception as e:  # noqa: BLE001 - never stop the host's generation
            failed(e)
            return call(apply_model, args)
        try:
            return call(apply_model, args)
        finally:
            active.remove()

    unet.set_model_unet_function_wrapper(dynfuse_unet_wrapper)
    job.host["wrapper"] = dynfuse_unet_wrapper


def _wrapper_in_place(job: Job) -> bool:
    """Whether the patcher the WebUI samples with still holds DynFuse's UNet wrapper (a later extension may have
    put its own in the single slot)."""
    unet = job.host["engine"].forge_objects.unet
    return unet.model_options.get("model_function_wrapper") is job.host.get("wrapper")


def _install_uncond_tap(unet: Any, job: Job) -> None:
    """Keep each step's unconditional x0 estimate for the size of the guidance step: the WebUI fires no
    cfg_denoised callback, but hands ``uncond_denoised`` to every sampler_post_cfg_function (a list: other
    extensions' functions stay). At CFG 1 it skips the uncond pass and hands zeros; x0 - 0 is x0, the scale
    Guidance.correct uses without an unconditional estimate."""
    store = job.host["uncond_x0"] = [None]

    def dynfuse_keep_uncond(args: dict) -> torch.Tensor:
        if store:
            store[0] = args["uncond_denoised"]
        return args["denoised"]

    unet.set_model_sampler_post_cfg_function(dynfuse_keep_uncond)


def _restore_unet(p: Any, job: Job) -> None:
    """After a failed takeover, give the WebUI back the patcher it had (with every LoRA in its store)."""
    source = job.host.get("source")
    objects = getattr(getattr(p, "sd_model", None), "forge_objects", None)
    if source is not None and objects is not None and objects.unet is job.host.get("clone"):
        objects.unet = source


def _forge_unet(p: Any) -> Any:
    objects = getattr(getattr(p, "sd_model", None), "forge_objects", None)
    return getattr(objects, "unet", None)


def lora_file(name: str) -> str | None:
    """The file the WebUI loaded for a <lora:name> tag: the loaded network of that name, else the name index."""
    try:
        import networks
    except ImportError:
        return None
    for net in getattr(networks, "loaded_networks", []):
        if getattr(net, "mentioned_name", None) == name and getattr(net, "network_on_disk", None) is not None:
            return net.network_on_disk.filename
    entry = getattr(networks, "available_network_aliases", {}).get(name)
    return getattr(entry, "filename", None)


def role_of_file(job: Job) -> Callable[[Any], str | None]:
    """A stored file name -> "subject" or "style" when it is that tag's LoRA file, else None; each name is
    resolved once (Neo's store names a file for every entry of every weight)."""
    tags = {role: (lora_file(getattr(job, role).name), getattr(job, role).name) for role in ROLES}

    @functools.cache
    def role_of(stored: Any) -> str | None:
        return next((role for role in ROLES if same_file(stored, *tags[role])), None)
    return role_of
