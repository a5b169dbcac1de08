"""Stable Diffusion WebUI Forge (main, `backend/` layout): take the subject and style LoRAs over from Forge's
weight merge and fuse them per layer and step with forward hooks.

Forge keeps each LoRA as weight patches on the UNet patcher, `unet.lora_patches[(file, strength, strength_model,
online)] = {model_key: [[strength, patch, strength_model, offset, function], ...]}`, and merges them into the
model when the patcher is loaded for sampling, re-merging only when the list of keys changes. So, before every
sampling run (`process_before_every_sampling`, three times for txt2img with hires fix):

1. clone the current UNet patcher and pop the two LoRAs' entries from the clone's own store (the per-file dicts
   are shared with Forge's cached patchers and are never edited), then assign the clone back: Forge restores the
   original weights and re-merges only the other LoRAs;
2. turn each popped patch into a delta (plain LoRA -> LowRankDelta; LoHa, LoKr, DoRA, diff -> DenseDelta
   computed with Forge's own merge function) on the module found by its path, `unet.model.get_submodule(path)`
   (Forge's Linear is not an nn.Linear);
3. open a FusionSession whose hooks add the chosen delta to each layer's output. DynFuse's
   `model_function_wrapper` puts the hooks on the shared model around each UNet call and takes them off in its
   `finally`, and tells the session the call's row layout from Forge's `cond_or_uncond` list. Should another
   extension take the wrapper slot later, the hooks go on for the whole sampling run instead (on_cfg_denoiser)
   and come off at the next takeover, at postprocess or at the start of the next job.

Patches dynfuse cannot fuse (Flux slices, `strength_model` != 1, norm layers) stay with Forge under a renamed key.

Guidance corrects the x0 estimate Forge hands to the after-CFG callback; the unconditional estimate that sizes
the step comes from a `sampler_post_cfg_function` on the same clone. Forge samples under inference mode with
inference-tensor weights, so everything guidance differentiates is built in `process()` outside it, and decoder
"vae" is a private copy of the checkpoint's VAE, never Forge's own.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from lib_dynfuse.hosts.base import HostAdapter, Job, add_note, refuse, say, say_once

ROLES = ("subject", "style")
# Entries dynfuse leaves to Forge get a key of their own: Forge re-merges only when the key list changes.
STATIC_SUFFIX = "#dynfuse-static"
UNSUPPORTED_VARIANT = (
    "this Forge keeps LoRAs in the old ldm_patched patch store (old Forge, reForge or Forge Classic); DynFuse "
    "supports current Forge (backend/ layout) and AUTOMATIC1111 1.9-1.10.1."
)


class NotFusable(Exception):
    """A patch dynfuse leaves to Forge's own merge; the message says why."""


class ForgeAdapter(HostAdapter):
    name = "forge"
    # forge_objects is reset from Forge's cached patchers before each sampling run, after every other hook.
    takeover_at = "process_before_every_sampling"

    # ---- checks ---------------------------------------------------------------------------------
    def unsupported_reason(self, p: Any) -> str | None:
        unet = _forge_unet(p)
        if unet is None:
            return None  # Forge loads the checkpoint lazily; take_over checks again
        if not (hasattr(unet, "lora_patches") and hasattr(unet, "lora_loader")):
            return UNSUPPORTED_VARIANT
        return None

    # ---- guidance inputs ------------------------------------------------------------------------
    def model_family(self, p: Any) -> str | None:
        model = getattr(p, "sd_model", None)
        for flag, family in (("is_sdxl", "SDXL"), ("is_sd2", "SD2"), ("is_sd1", "SD1.5")):
            if getattr(model, flag, False):
                return family
        return None  # Flux, SD3, Chroma: 16-channel latents no guidance decoder reads

    def taesd_dir(self) -> str | None:
        from modules import paths_internal

        return os.path.join(paths_internal.models_path, "VAE-taesd")  # as Forge's own sd_vae_taesd

    def guidance_vae(self, p: Any) -> Any | None:
        """A private, gradient-capable copy of the model's VAE on the guidance device: Forge's own is made of
        inference tensors and belongs to its memory manager, which must not move it in the middle of sampling."""
        objects = getattr(getattr(p, "sd_model", None), "forge_objects", None)
        vae = getattr(getattr(objects, "vae", None), "first_stage_model", None)
        if vae is None:
            return None
        from lib_dynfuse.guidance import private_module
        from lib_dynfuse.hosts import options

        with torch.inference_mode(False):
            return private_module(vae).to(options.scorer_config().torch_device())

    def lora_path(self, name: str) -> str | None:
        return _lora_file(name)

    # ---- the takeover ---------------------------------------------------------------------------
    def take_over(self, p: Any, job: Job) -> None:
        if job.failed:
            return
        try:
            self._close_session(job)
            engine = p.sd_model
            current = engine.forge_objects.unet
            if not hasattr(current, "lora_patches"):
                job.failed = True
                refuse(p, f"{UNSUPPORTED_VARIANT} DynFuse is off for this generation.", "off: unsupported WebUI")
                return
            # The first hires call sees the clone made for the first pass; start again from what it replaced.
            source = job.host["source"] if current is job.host.get("clone") else current
            unet = source.clone()
            order = list(unet.lora_patches)
            taken = self._pop_targets(unet, job)
            missing = [role for role in ROLES if not taken[role]]
            if missing:
                job.failed = True
                names = ", ".join(f"{role} '{getattr(job, role).name}'" for role in missing)
                refuse(p, f"the {names} LoRA has no UNet weights loaded by Forge (unknown name, or made for "
                          "another model family). DynFuse is off for this generation.",
                       "off: LoRA has no UNet weights")
                return
            targets, leftovers, notes = self._targets(unet, job, taken)
            if self.damaged_factors(p, job, targets):
                return
            for note in notes:
                say_once(job, note)
                add_note(p, note)
            unet.lora_patches = _in_order(order, unet.lora_patches, leftovers)

            from lib_dynfuse.session import FusionSession

            session = FusionSession(targets, job.settings.engine_options(), log_errors=say)
            # The factors go to the device at the first UNet call, after Forge has decided how much of the UNet
            # fits: ask it to leave room for them (it offloads more weights when memory is short).
            unet.add_extra_preserved_memory_during_sampling(_device_bytes(targets, unet.model.computation_dtype))
            # Tried once here, where a failure still gives Forge every LoRA back; from here on the hooks are on
            # the shared model only inside each UNet call (the wrapper below), or for the pass as a fallback.
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
        except Exception as e:  # noqa: BLE001 - never stop the host's generation
            _restore_unet(p, job)
            self.fail(p, "could not take over the LoRAs", e)

    def _pop_targets(self, unet: Any, job: Job) -> dict[str, list[tuple[tuple, dict]]]:
        """Pop the subject's and style's entries from the clone's own (shallow-copied) store."""
        files = {role: _lora_file(getattr(job, role).name) for role in ROLES}
        taken: dict[str, list[tuple[tuple, dict]]] = {role: [] for role in ROLES}
        for key in list(unet.lora_patches):
            for role in ROLES:
                if _same_lora(key[0], files[role], getattr(job, role).name):
                    taken[role].append((key, unet.lora_patches.pop(key)))
                    break
        return taken

    def _targets(self, unet: Any, job: Job, taken: dict[str, list[tuple[tuple, dict]]]):
        from lib_dynfuse.session import LayerTarget

        # module path -> role -> "weight" | "bias" -> entries
        layers: dict[str, dict[str, dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        origin: dict[tuple[str, str], tuple] = {}
        for role, items in taken.items():
            for key, patches in items:
                for model_key, entries in patches.items():
                    path, _, param = model_key.rpartition(".")
                    layers[path][role][param].extend(entries)
                    origin[(role, path)] = key
        overrides = {"subject": job.settings.subject_strength, "style": job.settings.style_strength}

        targets, notes = [], []
        # the popped store key -> the key and entries Forge keeps merging
        leftovers: dict[tuple, tuple[tuple, dict[str, list]]] = {}
        for path, by_role in layers.items():
            deltas: dict[str, Any] = {}
            for role, params in by_role.items():
                try:
                    module = unet.model.get_submodule(path)
                    _check_fusable(module)
                    base = unet.lora_loader.backup.get(f"{path}.weight", module.weight)
                    deltas[role] = _delta(params, base, overrides[role])
                except (NotFusable, AttributeError) as e:
                    key = origin[(role, path)]
                    rest_key, rest = _left_to_forge(key, params, overrides[role])
                    leftovers.setdefault(key, (rest_key, {}))[1].update(
                        {f"{path}.{param}": entries for param, entries in rest.items()})
                    notes.append(f"{path} keeps the {role} LoRA merged statically ({e})")
            if deltas:
                targets.append(LayerTarget(path, unet.model.get_submodule(path), deltas.get("subject"),
                                           deltas.get("style")))
        if len(notes) > 3:
            notes = notes[:2] + [f"... and {len(notes) - 2} more layers kept static"]
        return targets, leftovers, notes

    # ---- CFG callbacks --------------------------------------------------------------------------
    def on_cfg_denoiser(self, params: Any) -> None:
        job = self.job
        if job is None or job.failed or (job.session is None and job.guidance is None):
            return
        session = job.session
        from lib_dynfuse.layout import StepClock

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
            say_once(job, "another extension replaced Forge's UNet function wrapper after DynFuse set it; cond and "
                          "uncond rows of an image now decide separately.")

    def on_cfg_after_cfg(self, params: Any) -> None:
        """Forge hands the after-CFG x0 estimate ([B, C, h, w], an inference tensor; Forge's timestep samplers
        convert to epsilon only afterwards); the guided estimate assigned back is what the sampler uses."""
        job = self.job
        guidance = job.guidance if job is not None and not job.failed else None
        if guidance is None or "clock" not in job.host or not guidance.active:
            return
        denoiser = job.host.get("denoiser")
        try:
            uncond = (job.host.get("uncond_x0") or [None])[0]
            if uncond is not None and uncond.shape != params.x.shape:
                uncond = None
            params.x = self.guided_x0(job, params.x, uncond, denoiser)
        except Exception as e:  # noqa: BLE001
            self.guidance_failed(getattr(denoiser, "p", None), job, e)
        else:
            self.guidance_step_done(getattr(denoiser, "p", None), job)

    # ---- lifetime -------------------------------------------------------------------------------
    def release(self, job: Job, keep_job: bool = False) -> None:
        self._close_session(job)
        for key in ("clone", "source", "engine"):
            job.host.pop(key, None)
        tap = job.host.pop("uncond_x0", None)
        if tap is not None:
            tap.clear()  # the tap in the clone's model_options keeps nothing from now on

    def _close_session(self, job: Job) -> None:
        session = job.session
        holder = job.host.get("wrapper_session")
        if holder is not None:
            holder[0] = None  # the wrapper in Forge's patcher passes straight through from now on
        if session is not None:
            session.remove()
            job.last_log = session.log
            job.session = None

    def remove_leftovers(self) -> None:
        try:
            from lib_dynfuse.session import remove_leftover_hooks
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


def _device_bytes(targets: list, dtype: torch.dtype) -> int:
    """What the hooks' deltas take once cast to the UNet's computation dtype (the hooks cache them per device)."""
    size = torch.empty((), dtype=dtype).element_size()
    deltas = [d for t in targets for d in (t.subject, t.style) if d is not None]
    return size * sum(v.numel() for d in deltas for v in vars(d).values() if isinstance(v, torch.Tensor))


def _in_order(order: list[tuple], kept: dict[tuple, dict], leftovers: dict[tuple, tuple[tuple, dict]]) -> dict:
    """The clone's store with each popped LoRA's leftovers where that LoRA was: Forge merges the store in order,
    and a patch with strength_model != 1 scales everything merged into the weight before it."""
    store = {}
    for key in order:
        if key in kept:
            store[key] = kept[key]
        elif key in leftovers:
            rest_key, patches = leftovers[key]
            store[rest_key] = patches
    return store


def _left_to_forge(key: tuple, params: dict[str, list], override: float | None) -> tuple[tuple, dict[str, list]]:
    """The store key and entries under which a layer Forge keeps merging goes back into the clone's store.

    A strength override rewrites the strength in new entries (Forge's own lists and entries are shared with its
    cached patchers) and in the key: Forge re-merges only when the key list changes."""
    strength = key[1] if override is None else override
    rest_key = (f"{key[0]}{STATIC_SUFFIX}", strength, *key[2:])
    if override is None:
        return rest_key, params
    return rest_key, {param: [[override, *entry[1:]] for entry in entries] for param, entries in params.items()}


# ---- patches -> deltas ------------------------------------------------------------------------------
def _check_fusable(module: torch.nn.Module) -> None:
    """Hooks add a delta to a Linear's or Conv2d's output only (a norm layer's patches stay with Forge's merge)."""
    from lib_dynfuse.deltas import LayerGeometry

    try:
        LayerGeometry.of(module)
    except ValueError as e:
        raise NotFusable(str(e)) from None


def _delta(params: dict[str, list], base_weight: torch.Tensor, override: float | None):
    """One LoRA's contribution to one layer from its Forge patch entries (weight and optional bias)."""
    from lib_dynfuse.deltas import DenseDelta, LowRankDelta

    weight_entries, bias_entries = params.get("weight", []), params.get("bias", [])
    if set(params) - {"weight", "bias"}:
        raise NotFusable(f"patches on {sorted(set(params) - {'weight', 'bias'})}")
    for entry in weight_entries + bias_entries:
        if entry[3] is not None:
            raise NotFusable("a patch on a slice of a fused layer")
        if entry[2] != 1.0:
            raise NotFusable("the patch rescales the base weight")
    strengths = {override if override is not None else float(e[0]) for e in weight_entries + bias_entries}

    plain = _plain_lora(weight_entries)
    if plain is not None and len(strengths) == 1:
        # LowRankDelta applies its strength to the bias itself.
        up, down, alpha, mid = plain
        return LowRankDelta(down=down, up=up, mid=mid, alpha=alpha, strength=strengths.pop(),
                            bias=_bias_diff(bias_entries, 1.0))
    bias = _bias_diff(bias_entries, override)
    if not weight_entries:
        return DenseDelta(torch.zeros_like(base_weight, dtype=torch.float32), bias=bias)
    return DenseDelta(_dense_weight(weight_entries, base_weight, override), bias=bias,
                      rank=_nominal_rank(weight_entries))


def _nominal_rank(entries: list) -> int | None:
    """The summed rank of the weight patches as Forge's merge takes it (the rows of a LoRA's down factor, of
    LoHa's w1b, of a factorised LoKr's w2_b or else w1_b); None when a patch has none (diff, an unfactorised LoKr,
    glora, set)."""
    total = 0
    for entry in entries:
        patch = entry[1]
        rank = None
        if len(patch) == 2 and patch[0] in ("lora", "loha"):
            rank = int(patch[1][1].shape[0])
        elif len(patch) == 2 and patch[0] == "lokr":
            w1, w2, _alpha, _w1_a, w1_b, _w2_a, w2_b = patch[1][:7]
            factor = w2_b if w2 is None else (w1_b if w1 is None else None)
            rank = None if factor is None else int(factor.shape[0])
        if rank is None:
            return None
        total += rank
    return total


def _plain_lora(entries: list) -> tuple | None:
    """(up, down, alpha, mid) when the layer has exactly one plain kohya LoRA patch, else None."""
    if len(entries) != 1:
        return None
    patch, function = entries[0][1], entries[0][4]
    if function is not None or len(patch) != 2 or patch[0] != "lora":
        return None
    up, down, alpha, mid, dora_scale = patch[1][:5]
    if dora_scale is not None:
        return None
    return up, down, alpha, mid


def _bias_diff(entries: list, override: float | None) -> torch.Tensor | None:
    """The sum of the bias diffs, each at its own strength unless ``override`` replaces it."""
    total = None
    for strength, patch, *_ in entries:
        value = patch[1] if len(patch) == 2 else patch
        if len(patch) == 2 and patch[0] != "diff":
            raise NotFusable(f"a '{patch[0]}' patch on a bias")
        term = value[0].float() * (override if override is not None else float(strength))
        total = term if total is None else total + term
    return total


def _dense_weight(entries: list, base_weight: torch.Tensor, override: float | None) -> torch.Tensor:
    """ΔW exactly as Forge merges these patches: Forge's merge on the base weight, minus the base weight.

    Types whose delta does not depend on the weight are merged onto zeros, so ΔW carries no rounding of W."""
    from backend.patcher.lora import merge_lora_to_weight

    entries = [[override if override is not None else e[0], e[1], e[2], e[3], e[4]] for e in entries]
    base = base_weight.detach().float()
    if not any(_weight_dependent(e[1]) for e in entries):
        return merge_lora_to_weight(entries, torch.zeros_like(base), computation_dtype=torch.float32)
    return merge_lora_to_weight(entries, base, computation_dtype=torch.float32) - base


def _weight_dependent(patch: tuple) -> bool:
    if len(patch) != 2:
        return False
    kind, values = patch
    if kind in ("glora", "set"):
        return True
    dora_index = {"lora": 4, "loha": 7, "lokr": 8}.get(kind)
    return dora_index is not None and len(values) > dora_index and values[dora_index] is not None


# ---- Forge objects -------------------------------------------------------------------------------------
def _install_unet_wrapper(unet: Any, session: Any, job: Job, on_error: Callable[[Exception], None]) -> None:
    """Put the session's hooks on the shared model for each UNet call only, removed in its `finally` (an exception
    or interrupt leaves nothing on the model), and tell the session the call's rows: Forge batches one chunk of B
    rows per cond/uncond entry (`cond_or_uncond`, 0 = cond), uncond first, split over several calls when memory is
    short.

    A closure, not an object: Forge deep-copies model_options on every clone, and functions are copied by
    reference. The slot holds one wrapper, so an earlier one is chained (inside the hooks); an extension that
    replaces this one later leaves the hooks to the per-pass fallback in on_cfg_denoiser."""
    previous = unet.model_options.get("model_function_wrapper")
    holder = [session]
    calls = job.host["wrapper_calls"] = [0]
    job.host["wrapper_session"] = holder

    def call(apply_model: Callable, args: dict) -> torch.Tensor:
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def dynfuse_unet_wrapper(apply_model: Callable, args: dict) -> torch.Tensor:
        active = holder[0]
        if active is None:
            return call(apply_model, args)
        calls[0] += 1
        active.set_layout(_layout(args))
        if active.installed:  # the per-pass fallback put them on
            return call(apply_model, args)
        try:
            active.install()
        except Exception as e:  # noqa: BLE001 - never stop the host's generation
            on_error(e)
            return call(apply_model, args)
        try:
            return call(apply_model, args)
        finally:
            active.remove()

    unet.set_model_unet_function_wrapper(dynfuse_unet_wrapper)
    job.host["wrapper"] = dynfuse_unet_wrapper


def _layout(args: dict) -> Any:
    from lib_dynfuse.layout import BatchLayout

    chunks = list(args["cond_or_uncond"])
    rows = int(args["input"].shape[0])
    if not chunks or rows % len(chunks):
        return None
    per_chunk = rows // len(chunks)
    return BatchLayout.rows([i for _ in chunks for i in range(per_chunk)],
                            [kind == 0 for kind in chunks for _ in range(per_chunk)])


def _wrapper_in_place(job: Job) -> bool:
    """Whether the patcher Forge samples with still holds DynFuse's UNet wrapper (a later extension may have put
    its own in the single slot)."""
    unet = job.host["engine"].forge_objects.unet
    return unet.model_options.get("model_function_wrapper") is job.host.get("wrapper")


def _install_uncond_tap(unet: Any, job: Job) -> None:
    """Keep each step's unconditional x0 estimate for the size of the guidance step: Forge fires no
    cfg_denoised callback, but hands ``uncond_denoised`` to every sampler_post_cfg_function (a list: other
    extensions' functions stay). At CFG 1 Forge skips the uncond pass and hands zeros; x0 - 0 is x0, the scale
    Guidance.correct uses without an unconditional estimate."""
    store = job.host["uncond_x0"] = [None]

    def dynfuse_keep_uncond(args: dict) -> torch.Tensor:
        if store:
            store[0] = args["uncond_denoised"]
        return args["denoised"]

    unet.set_model_sampler_post_cfg_function(dynfuse_keep_uncond)


def _restore_unet(p: Any, job: Job) -> None:
    """After a failed takeover, give Forge back the patcher it had (with every LoRA in its store)."""
    source = job.host.get("source")
    objects = getattr(getattr(p, "sd_model", None), "forge_objects", None)
    if source is not None and objects is not None and objects.unet is job.host.get("clone"):
        objects.unet = source


def _forge_unet(p: Any) -> Any:
    objects = getattr(getattr(p, "sd_model", None), "forge_objects", None)
    return getattr(objects, "unet", None)


def _lora_file(name: str) -> str | None:
    """The file Forge loaded for a <lora:name> tag: the loaded network of that name, else the name index."""
    try:
        import networks
    except ImportError:
        return None
    for net in getattr(networks, "loaded_networks", []):
        if getattr(net, "mentioned_name", None) == name and getattr(net, "network_on_disk", None) is not None:
            return net.network_on_disk.filename
    entry = getattr(networks, "available_network_aliases", {}).get(name)
    return getattr(entry, "filename", None)


def _same_lora(stored: Any, filename: str | None, name: str) -> bool:
    if not isinstance(stored, str) or stored.endswith(STATIC_SUFFIX):
        return False
    if filename is not None:
        return os.path.normcase(os.path.abspath(stored)) == os.path.normcase(os.path.abspath(filename))
    return os.path.splitext(os.path.basename(stored))[0] == name
