"""The host-adapter interface the entry script drives, and the parts of a job every host shares.

The entry script (scripts/dynfuse.py) calls, per generation:

    job = adapter.begin_job(p, settings)        # Script.process: tags resolved, settings validated
    adapter.take_over(p, job)                   # A1111: after_extra_networks_activate (every activation)
                                                # Forge: process_before_every_sampling (every sampling run)
    adapter.on_cfg_denoiser(params)             # CFG callback: step clock and batch layout
    adapter.on_cfg_after_cfg(params)            # CFG callback: guidance seam
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
from typing import Any

NOTE_KEY = "DynFuse note"
SELECTION_KEY = "DynFuse selection"
VERSION_KEY = "DynFuse version"
CONSOLE_PREFIX = "DynFuse: "


def plain(message: str) -> str:
    """The message without a leading "DynFuse: " (core errors carry it; console lines add it once)."""
    return message.removeprefix(CONSOLE_PREFIX)


def say(message: str) -> None:
    """One console line the user can search for."""
    print(f"{CONSOLE_PREFIX}{plain(message)}", flush=True)


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


@dataclass
class Job:
    """One generation with dynfuse on. Created by begin_job, closed by end_job or cleanup."""

    settings: Any                      # lib_dynfuse.settings.DynFuseSettings
    subject: Any                       # lib_dynfuse.prompt_tags.LoraTag
    style: Any                         # lib_dynfuse.prompt_tags.LoraTag
    session: Any | None = None         # lib_dynfuse.session.FusionSession of the current activation
    failed: bool = False               # set after an error: the rest of the job runs as without dynfuse
    notes: list[str] = field(default_factory=list)
    last_log: Any | None = None        # DecisionLog of the latest session (kept after its hooks are gone)
    guidance: Any | None = None        # lib_dynfuse.guidance state, when guidance is on
    host: dict[str, Any] = field(default_factory=dict)   # adapter-private state (removed nets, proxies, ...)

    @property
    def labels(self) -> tuple[str, str]:
        return self.subject.name, self.style.name


class HostAdapter(abc.ABC):
    """What a host (A1111, Forge) must provide. Subclasses implement the three abstract hooks."""

    name: str = "host"
    # The Script method that calls take_over: A1111 after every activation of extra networks, Forge before
    # every sampling run (its LoRAs are patched into a fresh UNet clone there).
    takeover_at: str = "after_extra_networks_activate"

    def __init__(self) -> None:
        self.job: Job | None = None
        self.last_job: Job | None = None  # the latest finished job, for inspection

    # ---- shared by every host -------------------------------------------------------------------
    def begin_job(self, p: Any, settings: Any) -> Job | None:
        """Validate settings and find the two LoRA tags. None (with a message and note) keeps dynfuse off."""
        self.cleanup()
        _drop_stale_keys(p)
        if settings is None or not getattr(settings, "enabled", False):
            return None
        try:
            from lib_dynfuse import prompt_tags
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
        from lib_dynfuse.settings import to_infotext

        params = p.extra_generation_params
        params.update(to_infotext(job.settings, subject_label=job.subject.name, style_label=job.style.name))
        params[VERSION_KEY] = __version__
        # A callable is evaluated by the host when each image's infotext is built, i.e. after its batch sampled.
        params[SELECTION_KEY] = lambda **_: self.selection_text(job)

    def selection_text(self, job: Job) -> str | None:
        if job.failed:
            return None
        log = job.session.log if job.session is not None else job.last_log
        if log is None:
            return None
        from lib_dynfuse import report

        return report.selection_summary(log) or None

    def end_job(self, p: Any, job: Job | None, processed: Any) -> None:
        """Remove everything, then add the selection map when asked."""
        if job is None:
            return
        try:
            self.release(job)
        finally:
            self.job = None
            self.last_job = job
        if job.failed or processed is None:
            return
        try:
            from lib_dynfuse import report

            if job.settings.show_map and job.last_log is not None:
                _add_image(processed, report.selection_map(job.last_log))
            if job.guidance is not None and job.settings.show_loss_plot:
                _add_image(processed, job.guidance.loss_plot())
        except Exception as e:  # noqa: BLE001
            self.fail(p, "could not draw the report images", e)
        finally:
            if job.guidance is not None and _unload_guidance_models():
                from lib_dynfuse.guidance import unload

                unload()

    def cleanup(self) -> None:
        """Remove whatever an earlier job left behind (a crash skips postprocess). Idempotent."""
        job, self.job = self.job, None
        if job is not None:
            try:
                self.release(job)
            except Exception as e:  # noqa: BLE001
                say(f"cleanup failed: {e}")
        self.remove_leftovers()

    def fail(self, p: Any, what: str, error: BaseException) -> None:
        """An unexpected error: one line, a note, and the rest of the job runs as without dynfuse."""
        say(f"{what}: {type(error).__name__}: {error}. The generation continues without DynFuse.")
        if _debug():
            traceback.print_exc()
        add_note(p, f"off: {what} ({type(error).__name__})")
        job = self.job
        if job is not None:
            job.failed = True
            try:
                self.release(job, keep_job=True)
            except Exception as e:  # noqa: BLE001
                say(f"cleanup failed: {e}")

    # ---- host-specific --------------------------------------------------------------------------
    def unsupported_reason(self, p: Any) -> str | None:
        """A reason dynfuse cannot run on this host or model at all (None = fine)."""
        return None

    def prepare(self, p: Any, job: Job) -> None:
        """Host work at process() time after the job exists (e.g. busting the cond cache)."""

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
        """After-CFG callback: the guidance step, when guidance is on."""


def _add_image(processed: Any, image: Any) -> None:
    processed.images.append(image)
    if getattr(processed, "infotexts", None):
        processed.infotexts.append(processed.infotexts[0])


def _unload_guidance_models() -> bool:
    from lib_dynfuse.hosts import options

    return bool(options.read_option("dynfuse_unload_after"))


def _drop_stale_keys(p: Any) -> None:
    """XYZ cells share one extra_generation_params dict (a shallow copy of p): start each job clean."""
    params = getattr(p, "extra_generation_params", None)
    if params:
        for key in [k for k in params if isinstance(k, str) and k.startswith("DynFuse ")]:
            del params[key]


def _first_prompt(p: Any) -> str:
    prompts = getattr(p, "all_prompts", None) or [getattr(p, "prompt", "") or ""]
    first = prompts[0]
    return first if isinstance(first, str) else str(first)


def _debug() -> bool:
    import os

    return bool(os.environ.get("DYNFUSE_DEBUG"))


LogFn = Callable[[str], None]
