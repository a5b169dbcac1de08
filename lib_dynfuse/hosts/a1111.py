"""AUTOMATIC1111 WebUI 1.9-1.10.1: take the subject and style LoRAs away from the built-in Lora extension.

After every activation of extra networks (per batch, and again for the hires pass) the two `Network`s are
removed in place from `networks.loaded_networks`; that changes the merge cache key, so the host restores the
layers they touched and keeps merging every other LoRA as usual. Their text-encoder half, and the UNet layers no
hook can fuse (a norm layer's LyCORIS w_norm / b_norm), stay with the host through a renamed proxy `Network`
holding only those modules. The rest of their UNet half becomes deltas applied by a `FusionSession`'s forward
hooks. Model weights are never written by this module.

Host modules are imported inside functions: the built-in Lora's modules are top-level names (`networks`) that
exist only when that extension is enabled.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from lib_dynfuse.hosts import options
from lib_dynfuse.hosts.base import HostAdapter, Job, absent_role, add_note, say, say_once, turn_off

ROLES = ("subject", "style")
# The name of the proxy that carries what the host keeps merging of a taken LoRA: a cache key of its own.
PROXY_SUFFIX = "_dynfuse_static"
LORA_DISABLED = ("the built-in Lora extension is not loaded (it is disabled, or the WebUI runs with "
                 "--disable-all-extensions); DynFuse needs it to load LoRA files.")


def _networks() -> Any | None:
    try:
        import networks  # the built-in Lora extension's module, a top-level name in the host
    except ImportError:
        return None
    return networks if hasattr(networks, "loaded_networks") else None


def _is_text_encoder_key(sd_key: str) -> bool:
    # The host's own rule (NetworkModule.multiplier): text-encoder layer names have "transformer" early on.
    return "transformer" in sd_key[:20]


def _net_names(net: Any) -> set[str]:
    names = {getattr(net, "mentioned_name", None), getattr(net, "name", None)}
    name = getattr(net, "name", "") or ""
    if "_in_LBW_" in name:  # lora-block-weight renames the nets it edits
        names.add(name.split("_in_LBW_")[0])
    on_disk = getattr(net, "network_on_disk", None)
    if on_disk is not None:
        names.update({getattr(on_disk, "name", None), getattr(on_disk, "alias", None)})
    return {n for n in names if n}


class A1111Adapter(HostAdapter):
    name = "a1111"

    def unsupported_reason(self, p: Any) -> str | None:
        if _networks() is None:
            return LORA_DISABLED
        model = getattr(p, "sd_model", None)
        if getattr(model, "is_sd3", False):
            return "SD3 models are not supported."
        return None

    # ---- guidance inputs ------------------------------------------------------------------------
    def model_family(self, p: Any) -> str | None:
        model = getattr(p, "sd_model", None)
        if getattr(model, "is_sdxl", False):
            return "SDXL"
        return "SD2" if getattr(model, "is_sd2", False) else "SD1.5"

    def taesd_dir(self) -> str | None:
        import os

        from modules import paths

        return os.path.join(paths.models_path, "VAE-taesd")  # where the host's own TAESD previews live

    def guidance_vae(self, p: Any) -> Any | None:
        return getattr(p.sd_model, "first_stage_model", None)

    def lora_path(self, name: str) -> str | None:
        return _lora_path(name)

    # ---- takeover -------------------------------------------------------------------------------
    def take_over(self, p: Any, job: Job) -> None:
        if job is not self.job or job.failed:
            return
        networks = _networks()
        self._close_session(job)
        loaded = networks.loaded_networks
        snapshot = list(loaded)
        job.host["snapshot"] = snapshot
        try:
            nets = self._find_nets(p, job, loaded)
            if nets is None:
                return
            found = self._targets(p, job, *nets)
            if found is None:
                return
            targets, static = found
            # A one-LoRA method leaves the other LoRA out of the layers no hook can fuse too.
            static = [{} if role == absent_role(job.settings) else kept for role, kept in zip(ROLES, static)]
            if self.damaged_factors(p, job, targets):
                return
            overrides = (job.settings.subject_strength, job.settings.style_strength)
            self._remove_from_host(networks, loaded, list(zip(nets, static, overrides)), job)
            self._note_static(p, job, static)
            from lib_dynfuse.engine.session import FusionSession

            session = FusionSession(targets, options.engine_options(job.settings), log_errors=say)
            session.install()
            job.session = session
            job.add_pass(p, session.log)
        except Exception as e:  # noqa: BLE001 - the host must keep generating
            self.fail(p, "could not take over the LoRAs", e)

    def _find_nets(self, p: Any, job: Job, loaded: list) -> tuple[Any, Any] | None:
        found = []
        for tag in (job.subject, job.style):
            net = next((n for n in loaded if tag.name in _net_names(n)), None)
            if net is None:
                cause = self.file_problem(p, tag.name)
                why = f": {cause}" if cause else (" (file missing, failed to load, or not in this pass's prompt; see "
                                                  "the console above)")
                turn_off(p, job, f"LoRA '{tag.name}' is not loaded{why}.", f"off: LoRA {tag.name} not loaded")
                return None
            found.append(net)
        if found[0] is found[1]:
            turn_off(p, job, f"subject and style are the same LoRA ('{job.subject.name}'); choose two different "
                             "LoRAs.", "off: subject and style are the same LoRA")
            return None
        return found[0], found[1]

    def _targets(self, p: Any, job: Job, subject_net: Any, style_net: Any) -> tuple[list, list[dict]] | None:
        """The layers to fuse, and for each net the UNet layers no hook can fuse ({key: why}), which stay with
        the host's merge."""
        from lib_dynfuse.engine.deltas import LayerGeometry
        from lib_dynfuse.engine.session import LayerTarget

        mapping = getattr(p.sd_model, "network_layer_mapping", None) or {}
        settings = job.settings
        deltas, misfits, static = [], [], []
        for tag, net, strength in ((job.subject, subject_net, settings.subject_strength),
                                   (job.style, style_net, settings.style_strength)):
            layer_deltas, skipped, kept = {}, [], {}
            for key, module in net.modules.items():
                if _is_text_encoder_key(key):
                    continue
                layer = mapping.get(key)  # the current model's module: a cached sd_module may be stale
                if layer is None or getattr(layer, "weight", None) is None:
                    continue
                try:
                    LayerGeometry.of(layer)
                except ValueError as e:
                    kept[key] = str(e)
                    continue
                try:
                    layer_deltas[key] = (layer, _delta(module, layer, strength))
                except Misfit as e:
                    skipped.append((key, e))
            if not layer_deltas:
                cause = self.file_problem(p, tag.name)
                why = f": {cause}" if cause else " (is it made for another model family?)"
                turn_off(p, job, f"LoRA '{tag.name}' has no layers that fit this model's UNet{why}.",
                         f"off: LoRA {tag.name} does not fit the UNet")
                return None
            deltas.append(layer_deltas)
            static.append(kept)
            if skipped:
                misfits.append((tag.name, skipped, len(skipped) + len(layer_deltas)))
        for name, skipped, total in misfits:
            self._warn_misfits(p, job, name, skipped, total)
        subject_deltas, style_deltas = deltas
        if not subject_deltas.keys() & style_deltas.keys() and say_once(
                job, f"'{job.subject.name}' and '{job.style.name}' share no UNet layer: each layer gets its own "
                     "LoRA, as without DynFuse."):
            add_note(p, "no shared layers")
        targets = []
        for key in dict.fromkeys([*subject_deltas, *style_deltas]):
            layer = (subject_deltas.get(key) or style_deltas.get(key))[0]
            targets.append(LayerTarget(key, layer, _second(subject_deltas.get(key)), _second(style_deltas.get(key))))
        return targets, static

    @staticmethod
    def _warn_misfits(p: Any, job: Job, name: str, skipped: list[tuple[str, Misfit]], total: int) -> None:
        """Some layers of a LoRA have another shape than the model's (e.g. an SDXL LoRA's cross-attention on an
        SD1.5 model): the host skips them and merges the rest, and so does DynFuse. Said once per job."""
        key, first = skipped[0]
        say_once(job, f"{len(skipped)} of the {total} UNet layers of LoRA '{name}' do not fit this model (first: "
                      f"{key}, {first}); they are left out, as the host leaves them out.", key=f"misfit {name}")
        add_note(p, f"LoRA {name}: {len(skipped)} layers do not fit")

    @staticmethod
    def _note_static(p: Any, job: Job, static: list[dict[str, str]]) -> None:
        """Said once per job, noted in every pass's infotext (as on Forge)."""
        notes = []
        for role, kept in zip(ROLES, static):
            if kept:
                key, why = next(iter(kept.items()))
                layers = f"{key} keeps" if len(kept) == 1 else f"{key} and {len(kept) - 1} more layers keep"
                notes.append(f"{layers} the {role} LoRA merged statically ({why})")
        if notes:
            say_once(job, "; ".join(notes), key="kept static")
        for note in notes:
            add_note(p, note)

    def _remove_from_host(self, networks: Any, loaded: list, nets: list[tuple[Any, dict, float | None]],
                          job: Job) -> None:
        """Take the nets out of the host's list; what the host keeps merging of each goes back as a proxy."""
        proxies = {id(net): _host_proxy(net, static, override) for net, static, override in nets}
        rebuilt = []
        for net in loaded:
            if id(net) not in proxies:
                rebuilt.append(net)
            elif proxies[id(net)] is not None:
                rebuilt.append(proxies[id(net)])
        loaded[:] = rebuilt  # in place: lora.loaded_loras and other extensions hold this same list
        job.host["edited"] = rebuilt
        for net, _static, _override in nets:
            # With lora_in_memory_limit 0 an unreferenced net is read from disk again at the next activation.
            networks.networks_in_memory[net.name] = net

    # ---- step clock and batch layout ------------------------------------------------------------
    def on_cfg_denoiser(self, params: Any) -> None:
        job = self.job
        if job is None or job.failed or (job.session is None and job.guidance is None):
            return
        try:
            from lib_dynfuse.engine.layout import StepClock

            denoiser = getattr(params, "denoiser", None)
            index = getattr(denoiser, "step", None)
            total = getattr(denoiser, "total_steps", None)
            if index is None or not total:  # before 1.8 only the lagging state counter exists
                index, total = params.sampling_step, params.total_sampling_steps
            elif hasattr(denoiser, "alphas"):
                index = _timestep_step(job, denoiser, params)
            clock = StepClock(index=int(index), total=int(total), sigma=_sigma(params, denoiser))
            job.host["clock"] = clock
            job.host["denoiser"] = denoiser  # AfterCFGCallbackParams carries no reference to it
            n_images = _n_images(params)
            # The images' own x and t are the last rows (the uncond block): kept for epsilon-space guidance.
            job.host["x_t"], job.host["t"] = params.x[-n_images:], params.sigma[-n_images:]
            if job.session is not None:
                job.session.set_step(clock)
                job.session.set_layout(_layout(params, denoiser))
        except Exception as e:  # noqa: BLE001
            self.fail(getattr(getattr(params, "denoiser", None), "p", None), "could not read the sampler step", e)

    def on_cfg_denoised(self, params: Any) -> None:
        job = self.job
        if job is None or job.failed or job.guidance is None or "x_t" not in job.host:
            return
        n_images = job.host["x_t"].shape[0]
        # The unconditional estimate sets the size of the guidance step (a fraction of the CFG update).
        job.host["uncond_out"] = params.x[-n_images:].detach().clone() if params.x.shape[0] >= 2 * n_images else None

    def uncond_estimate(self, job: Job) -> Any | None:
        return job.host.get("uncond_out")

    def corrected(self, job: Job, x: Any, uncond: Any | None, denoiser: Any) -> Any:
        if denoiser is not None and hasattr(denoiser, "alphas"):  # DDIM, PLMS, UniPC: epsilon space
            clock, x_t, t = job.host["clock"], job.host["x_t"], job.host["t"]
            alpha_bar = denoiser.alphas[t.to(dtype=int)].view(-1, 1, 1, 1).to(x.device)
            return job.guidance.correct_eps(x, x_t, alpha_bar, uncond, progress=clock.progress, step=clock.index)
        return self.guided_x0(job, x, uncond, denoiser)

    # ---- cleanup --------------------------------------------------------------------------------
    def _close_session(self, job: Job) -> None:
        session, job.session = job.session, None
        if session is not None:
            session.remove()
            job.last_log = session.log

    def release(self, job: Job, keep_job: bool = False) -> None:
        self._close_session(job)
        edited = job.host.pop("edited", None)
        snapshot = job.host.pop("snapshot", None)
        networks = _networks()
        if networks is None or edited is None or snapshot is None:
            return
        loaded = networks.loaded_networks
        # Give the host back the list it activated, but only while it is still the one this job edited: after a
        # new activation it is the host's own again.
        if len(loaded) == len(edited) and all(a is b for a, b in zip(loaded, edited)):
            loaded[:] = snapshot

    def remove_leftovers(self) -> None:
        try:
            from modules import shared

            model = getattr(shared, "sd_model", None)
            root = getattr(model, "model", None)
            if root is None:
                return
            from lib_dynfuse.engine.session import remove_leftover_hooks

            removed = remove_leftover_hooks(root)
            if removed:
                say(f"removed {removed} hooks left by an interrupted generation.")
        except Exception as e:  # noqa: BLE001
            say(f"could not check for leftover hooks: {e}")


def _host_proxy(net: Any, static: dict[str, str], strength: float | None) -> Any | None:
    """What the host keeps merging of a taken net, its text-encoder modules and the UNet layers in ``static``, as
    a renamed shallow copy (a cache key of its own); None when there is nothing.

    The modules are shallow copies bound to the proxy, whose multipliers they read (NetworkModule.multiplier): the
    text encoder at the tag's te weight, the static UNet layers at the strength override if one is set, else at
    the tag's unet weight. The override is in the cache key, so a new one is merged anew."""
    kept = {k: m for k, m in net.modules.items() if _is_text_encoder_key(k) or k in static}
    if not kept:
        return None
    proxy = copy.copy(net)
    proxy.name = f"{net.name}{PROXY_SUFFIX}"
    if strength is not None:
        proxy.unet_multiplier = float(strength)
    proxy.modules = {}
    for key, module in kept.items():
        proxy.modules[key] = copy.copy(module)
        proxy.modules[key].network = proxy
    return proxy


def _lora_path(name: str) -> str | None:
    networks = _networks()
    entry = None if networks is None else networks.available_network_aliases.get(name)
    return getattr(entry, "filename", None)


def _n_images(params: Any) -> int:
    uncond = params.text_uncond
    uncond = uncond.get("crossattn") if isinstance(uncond, dict) else uncond
    return int(uncond.shape[0])


def _second(pair: tuple | None) -> Any | None:
    return None if pair is None else pair[1]


class Misfit(Exception):
    """A LoRA layer whose update does not fit the model's layer (the message says how). The host's merge raises on
    it, counts it as an error of that LoRA and merges the LoRA's other layers."""


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _delta(module: Any, layer: Any, strength: float | None) -> Any:
    """The UNet half of one LoRA layer as a core delta, at the tag's weight unless a strength is given. Raises
    Misfit for a layer the host's merge would skip."""
    from lib_dynfuse.engine.deltas import DenseDelta, LowRankDelta

    weight_shape = tuple(layer.weight.shape)
    # The host zero-pads every update of an inpainting model's 9-channel first conv from 4 input channels.
    inpaint_pad = 5 if len(weight_shape) == 4 and weight_shape[1] == 9 else 0
    multiplier = float(module.multiplier())
    plain = (getattr(module, "up_model", None) is not None and getattr(module, "down_model", None) is not None
             and getattr(module.network, "dyn_dim", None) is None and getattr(module, "dora_scale", None) is None
             and getattr(module, "bias", None) is None)
    if plain:
        mid = getattr(module, "mid_model", None)
        down, up = module.down_model.weight.detach(), module.up_model.weight.detach()
        kernel = tuple(down.shape[2:] if mid is None else mid.weight.shape[2:])
        shape = (int(up.shape[0]), int(down.shape[1]), *kernel)
        if (shape[0], shape[1] + inpaint_pad, *kernel) == weight_shape:
            rank = int(down.shape[0])
            return LowRankDelta(
                down=_pad_input_channels(down, inpaint_pad), up=up, mid=None if mid is None else mid.weight.detach(),
                alpha=module.calc_scale() * rank,
                strength=multiplier if strength is None else float(strength))
        if inpaint_pad or math.prod(shape) != math.prod(weight_shape):
            raise Misfit(f"LoRA {_dims(shape)}, model {_dims(weight_shape)}")
        # The same number of elements in another layout: the host reshapes the rebuilt update, as below.
    # LoHa, LoKr, full diff, DoRA, dyn-dim: the host's own rebuild, which already includes scale and multiplier.
    original = getattr(layer, "network_weights_backup", None)
    orig_weight = layer.weight if original is None else original.to(layer.weight.device)
    net = module.network
    saved = net.unet_multiplier
    at_one = strength is not None and multiplier == 0.0  # a zero tag weight would zero the rebuild: build it at 1
    if at_one:
        net.unet_multiplier = 1.0
    try:
        updown, ex_bias = module.calc_updown(orig_weight)
    except RuntimeError as e:  # what the host's merge catches, e.g. factors that cannot be multiplied
        raise Misfit(f"model {_dims(weight_shape)}: {e}") from e
    finally:
        net.unet_multiplier = saved
    if updown.dim() == 4:
        updown = _pad_input_channels(updown, inpaint_pad)
    if tuple(updown.shape) != weight_shape:
        raise Misfit(f"LoRA {_dims(tuple(updown.shape))}, model {_dims(weight_shape)}")
    factor = 1.0 if strength is None else float(strength) / (1.0 if at_one else multiplier)
    return DenseDelta(updown.detach(), None if ex_bias is None else ex_bias.detach(), strength=factor,
                      rank=_nominal_rank(module))


def _nominal_rank(module: Any) -> int | None:
    """The rank the host gives the module (NetworkModule.dim: the rows of LoRA's down factor, of LoHa's hada_w1_b,
    of a factorised LoKr's w2_b or w1_b), cut by a dyn-dim tag as the host's LoRA rebuild cuts it; None where the
    host has none (diff, norm, IA3, GLoRA, an unfactorised LoKr) or where dim counts OFT's blocks."""
    dim = getattr(module, "dim", None)
    if not isinstance(dim, int) or dim < 1 or hasattr(module, "oft_blocks"):
        return None
    dyn_dim = getattr(module.network, "dyn_dim", None)
    if dyn_dim and getattr(module, "up_model", None) is not None:
        return min(dim, int(dyn_dim))
    return dim


def _pad_input_channels(t: Any, extra: int) -> Any:
    """``t`` with ``extra`` zero input channels (dim 1) appended."""
    if not extra:
        return t
    import torch

    return torch.cat([t, t.new_zeros(t.shape[0], extra, *t.shape[2:])], dim=1)


def _timestep_step(job: Job, denoiser: Any, params: Any) -> int:
    """A timestep sampler's step: the place of this call's timestep among the timesteps of the sampling run so far.
    denoiser.step counts calls, and PLMS's first step calls the model twice, the second time at the next step's
    timestep; that call is the next step's. The other timestep samplers call it once per timestep."""
    timestep = float(params.sigma.reshape(-1)[0])
    if denoiser.step == 0 or "timesteps" not in job.host:  # the first call of a sampling run
        job.host["timesteps"] = []
    seen = job.host["timesteps"]
    if timestep not in seen:
        seen.append(timestep)
    return seen.index(timestep)


def _sigma(params: Any, denoiser: Any) -> float | None:
    if hasattr(denoiser, "alphas"):  # timestep samplers (DDIM, PLMS, UniPC): "sigma" holds integer timesteps
        return None
    sigma = getattr(params, "sigma", None)
    try:
        return float(sigma.reshape(-1)[0])
    except Exception:  # noqa: BLE001
        return None


def _layout(params: Any, denoiser: Any) -> Any | None:
    """Which UNet rows are cond / uncond of which image, in CFGDenoiser's order; None when it cannot be known."""
    from lib_dynfuse.engine.layout import BatchLayout

    uncond = params.text_uncond
    uncond = uncond.get("crossattn") if isinstance(uncond, dict) else uncond
    n_images = int(uncond.shape[0])
    repeats = None
    sampler = getattr(denoiser, "sampler", None)
    cond = (getattr(sampler, "sampler_extra_args", None) or {}).get("cond")
    batch = getattr(cond, "batch", None)  # MulticondLearnedConditioning: one list of AND-parts per image
    if batch is not None and len(batch) == n_images:
        repeats = [len(parts) for parts in batch]
    if repeats is None:
        text_cond = params.text_cond
        text_cond = text_cond.get("crossattn") if isinstance(text_cond, dict) else text_cond
        n_cond = int(text_cond.shape[0])
        if n_cond % n_images:
            return None
        repeats = [n_cond // n_images] * n_images
    image_of_row = [i for i, n in enumerate(repeats) for _ in range(n)] + list(range(n_images))
    is_cond = [True] * sum(repeats) + [False] * n_images
    if len(image_of_row) != int(params.x.shape[0]):  # an edit model's third block, or another extension's rows
        return None
    return BatchLayout.rows(image_of_row, is_cond)
