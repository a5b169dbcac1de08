"""The host-adapter interface the entry script drives, and the parts of a job every host shares.

The entry script (scripts/dynfuse.py) calls, per generation:

    job = adapter.begin_job(p, settings)        # Script.process: tags resolved, settings validated
    adapter.take_over(p, job)                   # A1111: after_extra_networks_activate (every activation)
                                                # Forge, Forge Neo: process_before_every_sampling (every
                                                #   sampling run)
    adapter.on_cfg_denoiser(params)             # CFG callback: step clock and batch layout
    adapter.on_cfg_after_cfg(params)            # CFG callback: guidance seam
    adapter.score_batch(p, job, images, n)      # Script.postprocess_batch: CLIP/DINO scores of the decoded batch
    adapter.end_job(p, job, processed)          # Script.postprocess: hooks removed, infotext, selection map
    adapter.cleanup()                           # start of the next job and script unload: leftovers of a crash

Every method catches its own failures: a problem prints one console line, adds a short "DynFuse note" to the
infotext and lets the generation continue as if dynfuse were off. Nothing here imports a host module.
"""

from __future__ import annotations

import abc
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lib_dynfuse.hosts import options

NOTE_KEY = "DynFuse note"
SELECTION_KEY = "DynFuse selection"
SCORES_KEY = "DynFuse scores"
VERSION_KEY = "DynFuse version"
CONSOLE_PREFIX = "DynFuse: "
SKIP_SCORES = f"To skip the scores, turn off {options.where('dynfuse_scores')}."
# Problems that would come back with every generation are said at the first only.
UNTIL_SETTINGS_CHANGE = "Not said again until a CLIP/DINO setting changes."
# A failed download is not tried again either (guidance.scorers): offline, each try takes most of a minute.
NOT_TRIED_AGAIN = "Not tried or said again until a CLIP/DINO setting changes or the WebUI restarts."
UNTIL_RESTART = "Not said again for these LoRAs until the WebUI restarts."
# What the CFG callbacks keep in Job.host for the guidance step only (the denoiser holds the whole of p).
GUIDANCE_STEP_STATE = ("denoiser", "x_t", "t", "uncond_out")


def plain(message: str) -> str:
    """The message without a leading "DynFuse: " (core errors carry it; console lines add it once)."""
    return message.removeprefix(CONSOLE_PREFIX)


def say(message: str) -> None:
    """One console line the user can search for: "DynFuse: " and the message, its line breaks (an error's text may
    hold several lines) made spaces."""
    print(CONSOLE_PREFIX + " ".join(plain(message).split()), flush=True)


def say_once(job: Job, message: str, key: str | None = None) -> bool:
    """Say ``message`` once per job (a takeover runs for every batch and hires pass): not again for the same
    ``key`` (default: the message itself). Whether it was said now."""
    said = job.host.setdefault("said", set())
    key = message if key is None else key
    if key in said:
        return False
    said.add(key)
    say(message)
    return True


def add_note(p: Any, note: str) -> None:
    """Append a short note to the infotext of this job (several notes are joined with "; ")."""
    params = getattr(p, "extra_generation_params", None)
    if params is None:
        return
    note = plain(note)
    old = params.get(NOTE_KEY)
    if old and note in str(old).split("; "):
        return
    params[NOTE_KEY] = f"{old}; {note}" if old else note


def refuse(p: Any, message: str, note: str) -> None:
    """Dynfuse stays off for this job: one console line and one infotext note."""
    say(message)
    add_note(p, note)


def turn_off(p: Any, job: Job, message: str, note: str) -> None:
    """A job found wrong while the LoRAs are taken over runs without DynFuse from here: the message and that it
    is off in one console line, and one note."""
    off(p, job)
    refuse(p, f"{message} DynFuse is off for this generation.", note)


def off(p: Any, job: Job) -> None:
    """The rest of the job runs as without DynFuse: its images' infotexts keep the note only, without the settings
    that would turn DynFuse on again when pasted (the images of earlier batches were made with it and keep
    them)."""
    job.failed = True
    _drop_stale_keys(p, keep=(NOTE_KEY,))


def absent_role(settings: Any) -> str | None:
    """The LoRA a one-LoRA method leaves out of every UNet layer, those no hook can fuse included ("style" for
    subject-only); None for the other methods. Its text-encoder half stays with the host, as for every method."""
    return {"subject-only": "style", "style-only": "subject"}.get(getattr(settings, "method", None))


@dataclass
class Job:
    """One generation with dynfuse on. Created by begin_job, closed by end_job or cleanup."""

    settings: Any                      # lib_dynfuse.settings.DynFuseSettings
    subject: Any                       # lib_dynfuse.loras.prompt_tags.LoraTag
    style: Any                         # lib_dynfuse.loras.prompt_tags.LoraTag
    session: Any | None = None         # lib_dynfuse.engine.session.FusionSession of the current activation
    failed: bool = False               # set after an error: the rest of the job runs as without dynfuse
    notes: list[str] = field(default_factory=list)
    last_log: Any | None = None        # DecisionLog of the latest session (kept after its hooks are gone)
    passes: list[tuple[int, Any]] = field(default_factory=list)  # (batch, DecisionLog) of every sampling run
    guidance: Any | None = None        # lib_dynfuse.guidance.Guidance, while guidance is on
    guided: Any | None = None          # its GuidanceRecord once the job has ended (decoder and encoders released)
    scorer: Any | None = None          # the Guidance whose encoders and references give the scores (or None)
    scores: dict[int, str] = field(default_factory=dict)  # image index in the job -> "subject-DINO 0.412, ..."
    host: dict[str, Any] = field(default_factory=dict)   # adapter-private state (removed nets, proxies, ...)

    @property
    def labels(self) -> tuple[str, str]:
        return self.subject.name, self.style.name

    def add_pass(self, p: Any, log: Any) -> None:
        """Keep a sampling run's log (filled while it samples) with its batch: an image's selection covers every
        pass of its batch, the first pass and the hires pass."""
        self.passes.append((int(getattr(p, "iteration", 0) or 0), log))

    def logs(self, batch: int | None = None) -> list[Any]:
        """The logs of one batch's passes in order, or of every pass."""
        # Forge calls process_before_every_sampling once more between the two hires passes, without sampling.
        return [log for b, log in self.passes if (batch is None or b == batch) and len(log)]

    def batches(self) -> list[tuple[int, list[Any]]]:
        """Every batch that sampled with DynFuse, with its passes' logs."""
        numbers = sorted({b for b, _ in self.passes}) or [0]
        return [(b, logs) for b in numbers if (logs := self.logs(b))]


class HostAdapter(abc.ABC):
    """What a host (A1111, Forge, Forge Neo) must provide. Subclasses implement the three abstract hooks."""

    name: str = "host"
    # The Script method that calls take_over: A1111 after every activation of extra networks, Forge and Forge Neo
    # before every sampling run (its LoRAs are patched into a fresh UNet clone there).
    takeover_at: str = "after_extra_networks_activate"
    # Replace the open_clip / timm model loaders (tests pass random-weight models): {"clip_factory": ...}.
    guidance_factories: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        self.job: Job | None = None
        self.last_job: Job | None = None  # the latest finished job, for inspection
        self.said: set[tuple] = set()  # keys of what say_once_per_session has said (one adapter per WebUI session)

    # ---- shared by every host -------------------------------------------------------------------
    def begin_job(self, p: Any, settings: Any) -> Job | None:
        """Validate settings and find the two LoRA tags. None (with a message and note) keeps dynfuse off."""
        self.cleanup()
        _drop_stale_keys(p)
        if settings is None or not getattr(settings, "enabled", False):
            return None
        try:
            from lib_dynfuse.loras import prompt_tags
            from lib_dynfuse.settings import SettingsError

            try:
                settings.validate()
            except SettingsError as e:
                refuse(p, f"{plain(str(e))}. DynFuse is off for this generation.", f"off: {plain(str(e))}")
                return None
            problem = self.unsupported_reason(p)
            if problem:
                refuse(p, f"{problem} DynFuse is off for this generation.", f"off: {problem}")
                return None
            try:
                tags = prompt_tags.parse_lora_tags(_first_prompt(p))
                subject, style = prompt_tags.resolve_roles(tags, settings.subject, settings.style)
            except prompt_tags.TagError as e:
                refuse(p, f"{plain(str(e))}. DynFuse is off for this generation.", f"off: {plain(str(e))}")
                return None
            job = Job(settings=settings, subject=subject, style=style)
            self.job = job
            self.write_settings_infotext(p, job)
            self.prepare(p, job)
            return job
        except Exception as e:  # noqa: BLE001 - never stop the host's generation
            self.fail(p, "could not start", e)
            return None

    def write_settings_infotext(self, p: Any, job: Job) -> None:
        from lib_dynfuse import __version__
        from lib_dynfuse.settings import CHOOSING_METHODS, to_infotext

        params = p.extra_generation_params
        params.update(to_infotext(job.settings, subject=job.subject, style=job.style))
        params[VERSION_KEY] = __version__
        # A callable is evaluated by the host when each image's infotext is built, i.e. after its batch sampled.
        if job.settings.method in CHOOSING_METHODS:
            params[SELECTION_KEY] = lambda **kwargs: self.selection_text(job, **kwargs)
        params[SCORES_KEY] = lambda **kwargs: scores_text(job, **kwargs)

    def selection_text(self, job: Job, p: Any = None, index: int | None = None, all_prompts: Any = None,
                       use_main_prompt: bool = False, **_: Any) -> str | None:
        """The "DynFuse selection" value of one image's infotext (create_infotext's locals, see scores_text): the
        image's own decisions in the passes of its batch; a grid, or a call without an image, gets every decision
        of the job."""
        if job.failed:
            return None
        image = None if use_main_prompt else _image_index(p, index, all_prompts)
        batch_size = _batch_size(p)
        logs = job.logs(None if image is None else image // batch_size)
        if not logs:
            return None
        from lib_dynfuse import report

        return report.selection_summary(logs, None if image is None else image % batch_size) or None

    def end_job(self, p: Any, job: Job | None, processed: Any) -> None:
        """Remove everything, then add the selection map when asked."""
        if job is None:
            options.unload_models_if_asked()  # also after jobs without DynFuse: the option may be newly on
            return
        try:
            self.release(job)
        finally:
            self.job = None
            self.last_job = job
        job.scorer = None
        try:
            if job.failed or processed is None:
                return
            from lib_dynfuse import report

            if job.settings.show_map:
                # One map per image (each decides for itself), its hires steps after its first pass's, with the
                # image's infotext.
                from lib_dynfuse.engine.decisions import DecisionLog

                batch_size = _batch_size(p)
                images = [(batch * batch_size + i, logs, i)
                          for batch, logs in job.batches() for i in DecisionLog.joined(logs).images]
                for image, logs, in_batch in images:
                    title = f"image {image + 1}: " if len(images) > 1 else ""
                    _add_image(processed, report.selection_map(logs, title=title, image=in_batch), image)
            if job.guidance is not None and job.settings.show_loss_plot and job.guidance.losses:
                _add_image(processed, job.guidance.loss_plot())
        except Exception as e:  # noqa: BLE001
            self.fail(p, "could not draw the report images", e)
        finally:
            _release_guidance(job)
            _settle_logs(job)
            options.unload_models_if_asked()

    def cleanup(self) -> None:
        """Remove whatever an earlier job left behind (a crash skips postprocess). Idempotent."""
        job, self.job = self.job, None
        if job is not None:
            try:
                self.release(job)
                # p (and its infotext callables, which hold the job) outlives a crashed job too.
                job.scorer = None
                _release_guidance(job)
                _settle_logs(job)
            except Exception as e:  # noqa: BLE001
                say(f"cleanup failed: {e}")
        self.remove_leftovers()

    def fail(self, p: Any, what: str, error: BaseException) -> None:
        """An unexpected error: one line, a note, and the rest of the job runs as without dynfuse."""
        say(f"{what}: {type(error).__name__}: {str(error).rstrip('.')}. The generation continues without DynFuse.")
        if _debug():
            traceback.print_exc()
        add_note(p, f"off: {what} ({type(error).__name__})")
        job = self.job
        if job is not None:
            off(p, job)
            try:
                self.release(job, keep_job=True)
            except Exception as e:  # noqa: BLE001
                say(f"cleanup failed: {e}")

    def damaged_factors(self, p: Any, job: Job, targets: list) -> bool:
        """Check the two LoRAs' parsed deltas (lib_dynfuse.loras.factors) before anything is taken from the host: a
        missing, mismatched or non-finite factor turns DynFuse off for the job, with one line and a note naming the
        LoRA and the layer, and leaves both LoRAs to the host's merge. Whether it did.

        Checked once per job (its LoRAs and strengths are the job's): every batch and hires pass takes the LoRAs
        over anew."""
        from lib_dynfuse.loras.factors import FactorError, check_deltas

        if job.host.get("factors checked"):
            return False
        for role in ("subject", "style"):
            tag = getattr(job, role)
            try:
                check_deltas((t.name, delta) for t in targets if (delta := getattr(t, role)) is not None)
            except FactorError as e:
                off(p, job)
                refuse(p, f"LoRA '{tag.name}' has a damaged layer ({e}). DynFuse is off for this generation and "
                          "leaves the LoRAs to the WebUI.", f"off: LoRA {tag.name} has {e.kind} in layer {e.layer}")
                return True
        job.host["factors checked"] = True
        return False

    def file_problem(self, p: Any, name: str) -> str | None:
        """What is wrong with the file of the LoRA tag ``name``, read from the file (lib_dynfuse.loras.files), for a
        LoRA the host loaded nothing of: the end of a sentence, or None when the file does not tell."""
        try:
            from lib_dynfuse.loras.files import file_problem

            return file_problem(self.lora_path(name), self.model_family(p))
        except Exception:  # noqa: BLE001 - only a better message was at stake
            return None

    # ---- guidance and scores ----------------------------------------------------------------------
    def prepare(self, p: Any, job: Job) -> None:
        """At process() time, outside the host's sampling loop: the guidance (when on) and the scorer (when the
        scores setting is on). Neither problem stops the fusion: one console line each, and it runs without."""
        import torch

        want_scores = bool(options.read_option("dynfuse_scores"))
        if not (job.settings.guidance or want_scores):
            return
        # Forge samples under inference_mode: what is built here must stay usable for gradients there.
        with torch.inference_mode(False):
            load_error = None
            if job.settings.guidance:
                load_error = self._start_guidance(p, job, want_scores)
            if want_scores:
                self._start_scorer(p, job, load_error)

    def _start_guidance(self, p: Any, job: Job, want_scores: bool) -> BaseException | None:
        """job.guidance, or a message and None. Returns the error when the encoders could not be loaded."""
        from lib_dynfuse.guidance import GuidanceError, ScorerLoadError
        from lib_dynfuse.guidance.errors import PREFIX as GUIDANCE_PREFIX

        family = self.model_family(p)
        try:
            if family is None:
                raise GuidanceError(f"{GUIDANCE_PREFIX}this model has no latent decoder for guidance (SD 1.5, SD 2, "
                                    "SDXL and FLUX-latent models -- FLUX.1, Chroma, Z-Image, Lumina 2 -- are "
                                    "supported).", "no decoder for this model")
            job.guidance = self._guidance(p, job, family=family, decoder=job.settings.guidance_decoder, log=say)
            for note in job.guidance.reference_notes():
                add_note(p, note)
            return None
        except ScorerLoadError as e:
            scores = " and no CLIP/DINO scores are written" if want_scores else ""
            self.say_once_per_session(_models_key(e), f"{plain(str(e))} Guidance is off for this generation{scores}; "
                                                      f"the fusion still runs. {_until(e)}")
            add_note(p, f"guidance off: {e.reason}")
            return e
        except GuidanceError as e:
            say(f"{plain(str(e))} Guidance is off for this generation; the fusion still runs.")
            add_note(p, f"guidance off: {e.reason}")
            return None
        except Exception as e:  # noqa: BLE001 - a host object we did not expect: the fusion still runs
            say(f"guidance could not start ({type(e).__name__}: {e}); it is off for this generation, the fusion "
                "still runs.")
            add_note(p, f"guidance off: could not start ({type(e).__name__})")
            return None

    def _start_scorer(self, p: Any, job: Job, load_error: BaseException | None) -> None:
        """job.scorer: the guidance itself, else one built for the scores only (its decoder is never used: the
        scores are taken on decoded images). Without references or models there are no scores, and the first
        batch says why (unless dynfuse is off by then: the job then runs as without it, scores included)."""
        from lib_dynfuse.guidance import ScorerLoadError
        from lib_dynfuse.guidance.errors import PREFIX as GUIDANCE_PREFIX

        if load_error is not None:  # already reported by the guidance
            return
        scorer = job.guidance
        if scorer is None:
            try:
                # With guidance off, its "the subject side is off" lines would only confuse: not shown.
                scorer = self._guidance(p, job, family=self.model_family(p) or "SD1.5", decoder="approx",
                                        log=lambda message: None)
            except ScorerLoadError as e:
                why = str(e).removeprefix(GUIDANCE_PREFIX).replace(", or turn guidance off.", ".")
                job.host["scores_off"] = ScoresOff(
                    f"no CLIP/DINO scores for this generation: {why} {SKIP_SCORES} {_until(e)}",
                    f"no scores: {e.reason}", _models_key(e))
                return
            except Exception as e:  # noqa: BLE001 - the scores are extras: never stop the generation for them
                job.host["scores_off"] = ScoresOff(
                    f"no CLIP/DINO scores for this generation ({type(e).__name__}: {e}). {SKIP_SCORES}")
                return
        if scorer.subject_embedding is None and scorer.style_embedding is None:
            job.host["scores_off"] = ScoresOff(
                "no CLIP/DINO scores for this generation: no reference image (add subject or style images in the "
                f"DynFuse panel, or put a preview image beside the LoRA files). {SKIP_SCORES} {UNTIL_RESTART}",
                key=("no reference", frozenset(job.labels)))
            return
        job.scorer = scorer

    def say_once_per_session(self, key: tuple | None, message: str) -> bool:
        """Say ``message`` unless this adapter (one per WebUI session) said one under ``key`` already; None: say
        it. Whether it was said now."""
        if key is not None:
            if key in self.said:
                return False
            self.said.add(key)
        say(message)
        return True

    def _guidance(self, p: Any, job: Job, *, family: str, decoder: str, log: LogFn) -> Any:
        """Guidance.prepare with this host's paths, VAE and prompt. Raises GuidanceError."""
        from lib_dynfuse.guidance import Guidance, GuidanceParams

        s = job.settings
        return Guidance.prepare(
            family=family,
            params=GuidanceParams(s.guidance_strength, s.guidance_balance, s.guidance_start, s.guidance_end,
                                  s.guidance_every),
            decoder=decoder, taesd_dir=self.taesd_dir(), vae=self.guidance_vae(p) if decoder == "vae" else None,
            scorer_config=options.scorer_config(), subject_refs=s.subject_refs, style_ref=s.style_ref,
            subject_lora=self.lora_path(job.subject.name), style_lora=self.lora_path(job.style.name),
            preview_extensions=_preview_extensions(), prompt=_first_prompt(p), log=log, **self.guidance_factories)

    def guided_x0(self, job: Job, x0: Any, x0_uncond: Any | None, denoiser: Any = None) -> Any:
        """The guidance step on an after-CFG x0 estimate; for inpainting the unmasked part stays the original."""
        clock = job.host["clock"]
        guided = job.guidance.correct(x0, x0_uncond, progress=clock.progress, step=clock.index)
        mask = getattr(denoiser, "mask", None)
        if guided is not x0 and mask is not None:
            guided = guided * denoiser.nmask + denoiser.init_latent * mask
        return guided

    def guidance_step_done(self, p: Any, job: Job) -> None:
        """After a guidance step: when guidance turned itself off in it (a non-finite gradient, out of memory), the
        images from this batch on say so."""
        reason = job.guidance.off_reason if job.guidance is not None else None
        if reason and p is not None:
            add_note(p, f"guidance off: {reason}")

    def guidance_failed(self, p: Any, job: Job, error: BaseException) -> None:
        """An unexpected error in the guidance step: it is off for the rest of the job, the image goes on."""
        job.guidance = None
        say(f"guidance failed ({type(error).__name__}: {error}); it is off for the rest of this generation.")
        if _debug():
            traceback.print_exc()
        if p is not None:
            add_note(p, f"guidance off: failed ({type(error).__name__})")

    def score_batch(self, p: Any, job: Job | None, images: Any, batch_number: int) -> None:
        """Postprocess_batch: the scores of the decoded images ([B, 3, H, W] in [0, 1]) of batch ``batch_number``,
        kept for their infotexts (built by the host right after this, image by image)."""
        if job is None or job.failed:
            return
        off = job.host.pop("scores_off", None)
        if off is not None and self.say_once_per_session(off.key, off.message) and off.note:
            add_note(p, off.note)
        scorer = job.scorer
        if scorer is None or images is None:
            return
        first = batch_number * int(getattr(p, "batch_size", 0) or len(images))
        prompts = list(getattr(p, "all_prompts", None) or [])[first:first + len(images)]
        try:
            from lib_dynfuse.guidance import format_scores

            # clip-T: each image against its own prompt (a batch may hold several, e.g. from a prompts file).
            rows = scorer.scores(images, prompts if len(prompts) == len(images) else None)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the images are done, only the scores are lost
            job.scorer = None
            say(f"could not compute the CLIP/DINO scores ({type(e).__name__}: {e}); none are written for the rest "
                f"of this generation. {SKIP_SCORES}")
            return
        for i, row in enumerate(rows):
            text = format_scores(row)
            if text:
                job.scores[first + i] = text

    # ---- host-specific --------------------------------------------------------------------------
    def unsupported_reason(self, p: Any) -> str | None:
        """A reason dynfuse cannot run on this host or model at all (None = fine)."""
        return None

    def model_family(self, p: Any) -> str | None:
        """"SD1.5", "SD2", "SDXL" or "FLUX" (the guidance decoders' families); None for a model guidance cannot
        decode."""
        return None

    def taesd_dir(self) -> str | None:
        """The host's TAESD folder (models/VAE-taesd), or None."""
        return None

    def guidance_vae(self, p: Any) -> Any | None:
        """A VAE module guidance may differentiate through (decoder "vae"), or None."""
        return None

    def lora_path(self, name: str) -> str | None:
        """The file of the LoRA a tag names (its preview image is the default reference), or None."""
        return None

    @abc.abstractmethod
    def take_over(self, p: Any, job: Job) -> None:
        """Take the two LoRAs away from the host's static path and open a FusionSession with hooks.

        Called after every activation / before every sampling run; must replace the previous session."""

    @abc.abstractmethod
    def release(self, job: Job, keep_job: bool = False) -> None:
        """Close the session (hooks removed, its log kept in job.last_log) and undo host-side changes of this
        job. Idempotent.

        keep_job=True: the job stays registered but inactive (after a failure mid-job)."""

    def remove_leftovers(self) -> None:
        """Find and remove hooks of any crashed earlier session on the current model."""

    def on_cfg_denoiser(self, params: Any) -> None:
        """CFG-denoiser callback: tell the session the step clock and batch layout."""

    def on_cfg_denoised(self, params: Any) -> None:
        """CFG-denoised callback: what guidance needs from the raw UNet outputs (read only)."""

    def on_cfg_after_cfg(self, params: Any) -> None:
        """After-CFG callback: the guidance step, when guidance is on. The WebUI hands the after-CFG estimate
        ([B, C, h, w], an inference tensor on Forge); the corrected one assigned back is what the sampler uses."""
        job = self.job
        guidance = job.guidance if job is not None and not job.failed else None
        if guidance is None or "clock" not in job.host or not guidance.active:
            return
        denoiser = job.host.get("denoiser")
        try:
            uncond = self.uncond_estimate(job)
            if uncond is not None and uncond.shape != params.x.shape:
                uncond = None
            params.x = self.corrected(job, params.x, uncond, denoiser)
        except Exception as e:  # noqa: BLE001
            self.guidance_failed(getattr(denoiser, "p", None), job, e)
        else:
            self.guidance_step_done(getattr(denoiser, "p", None), job)

    def uncond_estimate(self, job: Job) -> Any | None:
        """This step's unconditional estimate, which sets the size of the guidance step; None when unknown."""
        return None

    def corrected(self, job: Job, x: Any, uncond: Any | None, denoiser: Any) -> Any:
        """The after-CFG estimate ``x`` moved by one guidance step (in the space the sampler hands it)."""
        return self.guided_x0(job, x, uncond, denoiser)


@dataclass(frozen=True)
class ScoresOff:
    """Why a job writes no scores, said at its first batch: the console line, an infotext note (for a failure,
    not for the common case of no reference image), and the key under which it is said once per session (None:
    every time)."""

    message: str
    note: str | None = None
    key: tuple | None = None


def _models_key(error: Any) -> tuple:
    """A CLIP/DINO load failure comes back with every generation (the scores are on by default; an offline machine
    cannot download the models) until one of the settings that say which model to load, from where and on which
    device changes: those settings and the failure are the key it is said once under."""
    return ("models", options.scorer_config(), error.setting, error.reason)


def _until(error: Any) -> str:
    from lib_dynfuse.guidance import ModelDownloadError

    return NOT_TRIED_AGAIN if isinstance(error, ModelDownloadError) else UNTIL_SETTINGS_CHANGE


def scores_text(job: Job, p: Any = None, index: int | None = None, all_prompts: Any = None,
                use_main_prompt: bool = False, **_: Any) -> str | None:
    """The "DynFuse scores" value of one image's infotext; the host calls it with create_infotext's locals. A grid
    (use_main_prompt) stands for many images: no scores."""
    image = None if use_main_prompt else _image_index(p, index, all_prompts)
    return None if image is None else job.scores.get(image)


def _image_index(p: Any, index: int | None, all_prompts: Any) -> int | None:
    """The image's index in the job from create_infotext's arguments: inside the batch loop the host passes the
    batch's own prompt list and an index within the batch; elsewhere (Processed.infotext, the image saved before
    hires fix) the job's lists and an index within the job."""
    if p is None or index is None:
        return None
    if all_prompts is not None and all_prompts is getattr(p, "prompts", None):
        index += int(getattr(p, "iteration", 0)) * int(getattr(p, "batch_size", 1))
    return index


def _batch_size(p: Any) -> int:
    return max(int(getattr(p, "batch_size", 1) or 1), 1)


def _add_image(processed: Any, image: Any, source: int | None = None) -> None:
    """An extra output image with the infotext of the job's ``source``-th image (None: the first infotext)."""
    processed.images.append(image)
    infotexts = getattr(processed, "infotexts", None)
    if infotexts:
        at = 0 if source is None else int(getattr(processed, "index_of_first_image", 0) or 0) + source
        infotexts.append(infotexts[min(at, len(infotexts) - 1)])


def _release_guidance(job: Job) -> None:
    """Keep only the record of the job's guidance: the decoder (on Forge a private VAE copy), the reference
    embeddings and the last step's tensors go with it."""
    if job.guidance is not None:
        job.guided = job.guidance.record()
    job.guidance = None
    for key in GUIDANCE_STEP_STATE:
        job.host.pop(key, None)


def _settle_logs(job: Job) -> None:
    """A finished job keeps its decisions as host values only: p's infotext callables and the adapter's last_job
    hold the job after it ended, and must not hold the tensors its hooks made."""
    for log in {id(log): log for log in [job.last_log, *(log for _, log in job.passes)] if log is not None}.values():
        log.settle()


def _preview_extensions() -> tuple[str, ...]:
    # As the host's LoRA browser (ui_extra_networks.allowed_preview_extensions): also previews in samples_format.
    extension = options.samples_format()
    return (extension,) if extension else ()


def _drop_stale_keys(p: Any, keep: tuple[str, ...] = ()) -> None:
    """Remove the DynFuse keys (but ``keep``) from the job's infotext. XYZ cells share one extra_generation_params
    dict (a shallow copy of p): each job starts clean."""
    params = getattr(p, "extra_generation_params", None)
    if params:
        for key in [k for k in params if isinstance(k, str) and k.startswith("DynFuse ") and k not in keep]:
            del params[key]


def _first_prompt(p: Any) -> str:
    prompts = getattr(p, "all_prompts", None) or [getattr(p, "prompt", "") or ""]
    first = prompts[0]
    return first if isinstance(first, str) else str(first)


def _debug() -> bool:
    import os

    return bool(os.environ.get("DYNFUSE_DEBUG"))


LogFn = Callable[[str], None]
