"""The metric-guided correction of the x0 estimate (after CFG), and the similarity scores.

One ``Guidance`` object serves one generation: it holds the decoder, the encoders, the reference
embeddings (computed once, without gradients) and the per-step losses, and switches itself off for the rest
of the generation when something goes wrong during sampling.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .decoders import VaeDecoder, make_decoder
from .errors import PREFIX, out_of_memory, short
from .plot import loss_curve
from .references import ReferenceImageError, load_image, lora_reference
from .scorers import ScorerConfig, Scorers, where
from .spaces import shift_eps, x0_from_eps

SCORE_KEYS = ("subject-DINO", "style-CLIP", "clip-T")
# The DynFuse panel's controls for each side's references, as messages name them.
REFERENCE_CONTROLS = {"subject": "Subject references", "style": "Style reference"}


@dataclass(frozen=True)
class GuidanceParams:
    """User controls. strength: step size as a fraction of the CFG update (0 = off); balance: 1 = subject
    (DINO) only, 0 = style (CLIP) only; start/end: the active window as a fraction of the schedule
    (0 = pure noise); every: guide steps whose index is a multiple of this."""
    strength: float = 0.2
    balance: float = 0.5
    start: float = 0.0
    end: float = 1.0
    every: int = 1


def _pixels(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return F.normalize(v.float(), dim=-1)


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.float().pow(2).flatten(1).mean(1).sqrt()


def _clean_prompt(prompt: str) -> str:
    # Extra-network tags such as <lora:name:0.8> mean nothing to CLIP.
    return " ".join(re.sub(r"<[^<>]*>", " ", prompt).split())


@contextlib.contextmanager
def _grad_enabled(device: torch.device) -> Iterator[None]:
    """Gradients on, whatever the host's mode: Forge samples under inference_mode, A1111 under no_grad,
    and A1111 also autocasts (our models run in their own dtype)."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        yield


@dataclass(frozen=True)
class GuidanceRecord:
    """What a finished job keeps of its guidance: its decoder and encoders are released with it."""
    decoder_kind: str
    losses: tuple[tuple[int, float], ...]
    off_reason: str | None  # why guidance turned itself off during sampling, if it did


class Guidance:
    """Guides the x0 estimate toward the subject references (DINO) and the style reference (CLIP).

    Build with ``Guidance.prepare(...)`` outside the sampling loop (in the script's ``process``); raises
    GuidanceError (DecoderError, ScorerLoadError) with a user-facing message when it cannot run. A
    missing or unreadable reference only switches its side off: one message for all of them, and
    ``reference_notes`` for the infotext.
    """

    def __init__(self, decoder: nn.Module, scorers: Scorers, params: GuidanceParams = GuidanceParams(), *,
                 subject_refs: Sequence[object] = (), style_ref: object | None = None,
                 prompt: str | None = None, decoder_kind: str = "", log: Callable[[str], None] = print,
                 notes: dict[str, str] | None = None) -> None:
        """``subject_refs``/``style_ref``: PIL images, paths, base64 strings or UnreadableImage. ``notes``: where
        each side's references came from (shown by ``sides``). Embeds the references once, loading the encoders
        on first use (later jobs reuse the cached models). Raises ScorerLoadError when an encoder cannot be
        loaded."""
        self.decoder = decoder
        self.decoder_kind = decoder_kind
        self.scorers = scorers
        self.params = params
        self.prompt = _clean_prompt(prompt) if prompt else ""
        self.log = log
        self.messages: list[str] = []
        self.losses: list[tuple[int, float]] = []
        self.runs: list[int] = []  # where in ``losses`` each sampling run (batch, hires pass) starts
        self.sides: dict[str, str] = dict(notes or {})
        self.off_sides: dict[str, str] = {}  # side -> why it has no reference
        self.unreadable: dict[str, list[str]] = {}  # side -> what was wrong with each unreadable reference
        self.active = True
        self.off_reason: str | None = None  # why guidance turned itself off during sampling
        self._last_progress = -1.0
        self._texts: dict[str, torch.Tensor] = {}
        self._place_decoder()
        self.subject_embedding = self._reference("subject", subject_refs, scorers.dino_image)
        self.style_embedding = self._reference("style", [style_ref] if style_ref is not None else [],
                                               scorers.clip_image)
        problems = self._reference_problems()
        if problems:
            self._say(problems)

    @classmethod
    def prepare(cls, *, family: str, params: GuidanceParams = GuidanceParams(), decoder: str = "auto",
                taesd_dir: str | os.PathLike | None = None, vae: object | None = None,
                scorer_config: ScorerConfig | None = None, subject_refs: Sequence[object] = (),
                style_ref: object | None = None, subject_lora: str | os.PathLike | None = None,
                style_lora: str | os.PathLike | None = None, preview_extensions: tuple[str, ...] = (),
                prompt: str | None = None, log: Callable[[str], None] = print,
                clip_factory: Callable | None = None, dino_factory: Callable | None = None) -> Guidance:
        """Everything one job needs. References: the images given, else the LoRA's preview image beside
        its file (``subject_lora``/``style_lora`` paths; ``preview_extensions`` adds e.g. the host's
        samples_format), else that side is off. ``vae``: the host VAE module for decoder "vae" (on Forge a
        ``private_module`` copy). The factories replace the open_clip/timm loaders (tests)."""
        module, kind_used = make_decoder(decoder, family, taesd_dir=taesd_dir, vae=vae)
        notes: dict[str, str] = {}
        if not subject_refs:
            image, notes["subject"] = lora_reference(subject_lora, preview_extensions)
            subject_refs = [image] if image is not None else []
        else:
            notes["subject"] = f"{len(subject_refs)} image(s) given"
        if style_ref is None:
            style_ref, notes["style"] = lora_reference(style_lora, preview_extensions)
        else:
            notes["style"] = "image given"
        scorers = Scorers(scorer_config or ScorerConfig(), clip_factory=clip_factory, dino_factory=dino_factory)
        return cls(module, scorers, params, subject_refs=subject_refs, style_ref=style_ref, prompt=prompt,
                   decoder_kind=kind_used, log=log, notes=notes)

    # ---- setup -------------------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        self.messages.append(message)
        self.log(message)

    def _place_decoder(self) -> None:
        # Our own decoders follow the encoders' device and precision; a host VAE stays where it is.
        if not isinstance(self.decoder, VaeDecoder):
            with torch.inference_mode(False):
                self.decoder.to(self.scorers.device, self.scorers.dtype)
        tensor = next(iter(list(self.decoder.parameters()) + list(self.decoder.buffers())), None)
        self.decoder_device = tensor.device if tensor is not None else self.scorers.device
        self.decoder_dtype = tensor.dtype if tensor is not None and tensor.is_floating_point() else torch.float32

    def _reference(self, side: str, sources: Sequence[object],
                   embed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        """Mean unit embedding of a side's readable references, or None (the side is off)."""
        images = []
        for source in sources:
            try:
                images.append(load_image(source))
            except ReferenceImageError as error:
                self.unreadable.setdefault(side, []).append(str(error))
        if not images:
            control = REFERENCE_CONTROLS[side]
            if side in self.unreadable:
                why = f"{control}: {'; '.join(self.unreadable[side])}"
            else:
                found = self.sides.get(side)
                why = f"no image under {control}" + (f", and {found}" if found else "")
            self.off_sides[side] = why
            self.sides[side] = f"off ({why})"
            return None
        # Outside inference mode: the embeddings enter the loss, whose backward must be able to save them.
        with torch.inference_mode(False), torch.no_grad():
            embeddings = torch.cat([_unit(embed(_pixels(image))) for image in images])
        return _unit(embeddings.mean(0))

    def _weight(self, side: str) -> float:
        return self.params.balance if side == "subject" else 1.0 - self.params.balance

    def _weighted_sides(self) -> list[str]:
        # A side the balance gives no weight is not missed when its reference is.
        return [side for side in REFERENCE_CONTROLS if self._weight(side) > 0]

    def _reference_problems(self) -> str | None:
        """One line on every missing or unreadable reference of the sides that count, or None."""
        parts, off = [], []
        for side in self._weighted_sides():
            if side in self.off_sides:
                parts.append(f"the {side} side is off ({self.off_sides[side]})")
                off.append(REFERENCE_CONTROLS[side])
            elif side in self.unreadable:
                parts.append(f"{REFERENCE_CONTROLS[side]}: {'; '.join(self.unreadable[side])}; skipped")
        if not parts:
            return None
        advice = (f" Add an image under {' / '.join(off)} in the DynFuse panel, or put a preview image beside the "
                  "LoRA file." if off else "")
        return f"{PREFIX}{'; '.join(parts)}.{advice}"

    def reference_notes(self) -> list[str]:
        """Infotext notes: which side is off for want of a reference, and references that were skipped."""
        notes = []
        for side in self._weighted_sides():
            if side in self.off_sides:
                why = "unreadable reference" if side in self.unreadable else "no reference image"
                notes.append(f"guidance {side} side off: {why}")
            elif side in self.unreadable:
                notes.append(f"guidance: {len(self.unreadable[side])} unreadable {side} reference(s) skipped")
        return notes

    # ---- the correction ----------------------------------------------------------------------------

    def _weights(self) -> tuple[float, float]:
        subject = self._weight("subject") if self.subject_embedding is not None else 0.0
        style = self._weight("style") if self.style_embedding is not None else 0.0
        return subject, style

    def due(self, progress: float, step: int) -> bool:
        """Whether ``correct`` would change anything at this step."""
        p = self.params
        return (self.active and p.strength != 0 and any(w > 0 for w in self._weights())
                and p.start <= progress <= p.end and step % max(p.every, 1) == 0)

    def _loss_rows(self, images: torch.Tensor) -> torch.Tensor:
        w_subject, w_style = self._weights()
        loss = images.new_zeros(images.shape[0], dtype=torch.float32)
        if w_subject > 0:
            loss = loss - w_subject * (_unit(self.scorers.dino_image(images)) @ self.subject_embedding)
        if w_style > 0:
            loss = loss - w_style * (_unit(self.scorers.clip_image(images)) @ self.style_embedding)
        return loss

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        """Per-row loss of x0 latents (no gradient): −(balance·cos_DINO + (1−balance)·cos_CLIP)."""
        with torch.inference_mode(False), torch.no_grad():
            return self._loss_rows(self._decode(x0.clone()))

    def _decode(self, x0: torch.Tensor) -> torch.Tensor:
        return self.decoder(x0.to(self.decoder_device, self.decoder_dtype)).float()

    def _gradient(self, x0: torch.Tensor) -> tuple[torch.Tensor, float]:
        with _grad_enabled(self.decoder_device):
            # clone() under inference_mode(False) turns a Forge inference tensor into a normal one.
            z = x0.clone().to(self.decoder_device, torch.float32).detach().requires_grad_(True)
            loss = self._loss_rows(self._decode(z))
            (grad,) = torch.autograd.grad(loss.sum(), z)
        return grad, float(loss.detach().mean())

    def correct(self, denoised: torch.Tensor, x0_uncond: torch.Tensor | None = None, *, progress: float,
                step: int, rows: Sequence[int] | None = None) -> torch.Tensor:
        """The guided x0 estimate: ``denoised − strength · RMS(denoised − x0_uncond) / RMS(g) · g`` per row,
        g = ∂loss/∂x0 through decoder and encoders only (no UNet backward).

        denoised: the x0 estimate after CFG, ``[B, C, h, w]`` latent (× VAE scale factor), any float dtype,
        any grad mode (no_grad, inference_mode). x0_uncond: the unconditional x0 estimate, row-aligned with
        ``denoised``, or None. progress: position in the schedule, 0 = pure noise. step: the sampling step
        index (for ``every`` and messages). rows: rows to guide (default all; pass the conditional rows when
        ``denoised`` holds uncond rows too). Returns ``denoised`` itself when nothing is due, otherwise a
        new tensor of the same shape, dtype and device in which only ``rows`` differ.
        """
        if not self.due(progress, step):
            return denoised
        index = list(range(denoised.shape[0])) if rows is None else list(rows)
        if not index:
            return denoised
        picked = denoised[index]
        try:
            grad, loss = self._gradient(picked)
        except Exception as error:  # noqa: BLE001 -- e.g. out of memory: the image is still worth finishing
            if out_of_memory(error):
                return self._switch_off(denoised, f"out of memory at step {step}",
                                        f"Choose Decoder 'approx', or set {where('device')} to cpu.")
            failed = f"failed at step {step} ({type(error).__name__}"
            return self._switch_off(denoised, f"{failed})", "If it happens again, choose Decoder 'approx'.",
                                    said=f"{failed}: {short(error)})")
        if not (torch.isfinite(grad).all() and np.isfinite(loss)):
            return self._switch_off(denoised, f"the gradient was not finite at step {step}",
                                    "Lower Guidance strength or choose Decoder 'approx'.")
        self._record_loss(step, progress, loss)
        grad = grad.to(denoised.device)
        x0 = picked.float()
        # FreeDoM: the step is a fixed fraction of the CFG update. Without an unconditional estimate
        # (CFG scale 1, or the host did not give one) x0 itself sets the scale: larger, still scale-free.
        reference = x0 - x0_uncond[index].float() if x0_uncond is not None else x0
        size = self.params.strength * _rms(reference) / _rms(grad).clamp_min(1e-12)
        out = denoised.clone()
        out[index] = (x0 - size.view(-1, *([1] * (grad.dim() - 1))) * grad).to(denoised.dtype)
        return out

    def correct_eps(self, eps: torch.Tensor, x_t: torch.Tensor, alpha_bar: float | torch.Tensor,
                    eps_uncond: torch.Tensor | None = None, *, progress: float, step: int,
                    rows: Sequence[int] | None = None) -> torch.Tensor:
        """``correct`` for epsilon predictions (A1111 DDIM/PLMS/UniPC): converts to x0 with x_t fixed, guides,
        and converts the x0 change back (eps' = eps − sqrt(ᾱ)/sqrt(1−ᾱ)·Δx0). ``x_t`` and ``alpha_bar`` (float
        or one per row) belong to the rows of ``eps``. Returns ``eps`` itself when nothing is due."""
        if not self.due(progress, step):
            return eps
        x0 = x0_from_eps(x_t, eps, alpha_bar)
        x0_uncond = x0_from_eps(x_t, eps_uncond, alpha_bar) if eps_uncond is not None else None
        guided = self.correct(x0, x0_uncond, progress=progress, step=step, rows=rows)
        return eps if guided is x0 else shift_eps(eps, guided - x0, alpha_bar)

    def _record_loss(self, step: int, progress: float, loss: float) -> None:
        # Steps and progress only grow within one sampling run; a new batch or hires pass starts over.
        if not self.losses or step <= self.losses[-1][0] or progress < self._last_progress:
            self.runs.append(len(self.losses))
        self.losses.append((step, loss))
        self._last_progress = progress

    def _switch_off(self, denoised: torch.Tensor, reason: str, advice: str, said: str | None = None) -> torch.Tensor:
        """Guidance stays off for the rest of the generation, later batches included. ``reason``: why, short,
        kept in ``off_reason`` for the infotext; ``said``: the console's fuller version; ``advice``: what to change."""
        self.active = False
        self.off_reason = reason
        self._say(f"{PREFIX}{said or reason}; guidance is off for the rest of this generation. {advice}")
        return denoised

    def loss_plot(self) -> Image.Image:
        """The per-step loss curves of this generation, one line per sampling run."""
        ends = self.runs[1:] + [len(self.losses)]
        return loss_curve([self.losses[start:end] for start, end in zip(self.runs, ends)])

    def record(self) -> GuidanceRecord:
        return GuidanceRecord(self.decoder_kind, tuple(self.losses), self.off_reason)

    # ---- scores ------------------------------------------------------------------------------------

    def scores(self, images: torch.Tensor | Sequence[Image.Image],
               prompts: Sequence[str] | None = None) -> list[dict[str, float]]:
        """Per image: "subject-DINO" (cosine to the mean subject reference), "style-CLIP" (to the style
        reference) and "clip-T" (to the image's prompt), each only when its reference / the prompt exists.

        images: PIL images, an RGB tensor ``[B, 3, H, W]`` in [0, 1], or latents ``[B, C, h, w]`` (C ≠ 3,
        decoded with this job's decoder). Final images are best scored as the PIL images the host saved.
        prompts: each image's own prompt (extra-network tags are dropped); default the job's prompt for all.
        """
        with torch.inference_mode(False), torch.no_grad():
            if isinstance(images, torch.Tensor):
                batches = [images.clone().float() if images.shape[1] == 3 else self._decode(images.clone())]
            else:  # PIL images may differ in size: one batch each
                batches = [_pixels(image) for image in images]
            texts = [_clean_prompt(p) for p in prompts] if prompts is not None else None
            result: list[dict[str, float]] = []
            for batch in batches:
                n = batch.shape[0]
                batch_texts = texts[len(result):len(result) + n] if texts is not None else [self.prompt] * n
                result += self._score_batch(batch.clamp(0, 1), batch_texts)
            return result

    def _score_batch(self, pixels: torch.Tensor, texts: list[str]) -> list[dict[str, float]]:
        result: list[dict[str, float]] = [{} for _ in range(pixels.shape[0])]
        if self.subject_embedding is not None:
            for row, value in zip(result, (_unit(self.scorers.dino_image(pixels)) @ self.subject_embedding).tolist()):
                row["subject-DINO"] = value
        if self.style_embedding is not None or any(texts):
            clip = _unit(self.scorers.clip_image(pixels))
            for row, image, text in zip(result, clip, texts):
                if self.style_embedding is not None:
                    row["style-CLIP"] = float(image @ self.style_embedding)
                if text:
                    row["clip-T"] = float(image @ self._text(text))
        return result

    def _text(self, prompt: str) -> torch.Tensor:
        if prompt not in self._texts:
            self._texts[prompt] = _unit(self.scorers.clip_text([prompt])[0])
        return self._texts[prompt]


def format_scores(scores: dict[str, float]) -> str:
    """Infotext form: ``subject-DINO 0.412, style-CLIP 0.655, clip-T 0.301`` (only the keys present)."""
    return ", ".join(f"{key} {scores[key]:.3f}" for key in SCORE_KEYS if key in scores)


__all__ = ["REFERENCE_CONTROLS", "SCORE_KEYS", "Guidance", "GuidanceParams", "GuidanceRecord", "format_scores"]
