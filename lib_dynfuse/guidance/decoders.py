"""Differentiable latent -> RGB decoders for guidance.

Every decoder maps a diffusion latent (the sampler's x0 estimate, already multiplied by the VAE scale factor)
to RGB in roughly [0, 1]. Values are not clamped: a clamp would zero the gradient of saturated pixels.

The encoders only take 224-px images, so TAESD decodes a latent shrunk to give that size (``decode_size``)
rather than a full-size image that the encoders' resize would mostly throw away: at 512 px that is a fifth
of the pixels to decode and to differentiate. The linear preview map and the exact VAE decode the latent
as it is.

Decoders are private modules built outside inference mode. Forge runs sampling under
``torch.inference_mode()`` and loads its weights as inference tensors, which cannot take part in a backward
pass; parameters created (or cloned) under ``torch.inference_mode(False)`` can.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PREFIX, DecoderError, short

DECODER_KINDS = ("auto", "approx", "taesd", "vae")
# The input side of CLIP ViT-B/32 and DINO ViT-S/16: a larger decode is thrown away by their resize.
DECODE_SIZE = 224

# Latent -> RGB projections the hosts use for their "Approx cheap" live preview (A1111
# modules/sd_vae_approx.py). Rows are latent channels, columns R, G, B; the result is ~[-1, 1].
_APPROX_SD1 = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
_APPROX_SDXL = (
    (0.3448, 0.4168, 0.4395),
    (-0.1953, -0.0290, 0.0250),
    (0.1074, 0.0886, -0.0163),
    (-0.3730, -0.2499, -0.2088),
)


# The FLUX.1 autoencoder's 16-channel latent (FLUX.1, Chroma, Z-Image and Lumina 2 all decode with it): the preview
# factors ComfyUI and Forge Neo publish for it (latent_formats.py / huggingface_guess latent.py, class Flux), rows
# per latent channel, plus a bias per colour; the result is ~[-1, 1].
_APPROX_FLUX = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
)
_APPROX_FLUX_BIAS = (-0.0329, -0.0718, -0.0851)


class _Family:
    def __init__(self, approx: tuple, taesd_file: str, vae_scale: float, vae_shift: float = 0.0,
                 approx_bias: tuple = (0.0, 0.0, 0.0)) -> None:
        self.approx = approx
        self.approx_bias = approx_bias
        self.taesd_file = taesd_file
        self.vae_scale = vae_scale
        self.vae_shift = vae_shift
        self.latent_channels = len(approx)


_FAMILIES = {
    "SD1.5": _Family(_APPROX_SD1, "taesd_decoder.pth", 0.18215),
    # SD2 shares the SD1 VAE, hence its preview table and TAESD.
    "SD2": _Family(_APPROX_SD1, "taesd_decoder.pth", 0.18215),
    "SDXL": _Family(_APPROX_SDXL, "taesdxl_decoder.pth", 0.13025),
    # TAEF1: TAESD's decoder for the FLUX.1 latent (madebyollin/taesd), as the WebUIs' TAESD preview loads it.
    "FLUX": _Family(_APPROX_FLUX, "taef1_decoder.pth", 0.3611, 0.1159, _APPROX_FLUX_BIAS),
}
_FAMILY_ALIASES = {"sd1": "SD1.5", "sd15": "SD1.5", "sd1.5": "SD1.5", "sd2": "SD2", "sdxl": "SDXL", "flux": "FLUX",
                   "flux1": "FLUX", "flux.1": "FLUX"}


def latent_family(latent_format: object) -> str | None:
    """The decoder family of a model whose latents a WebUI describes with ``latent_format`` (Forge's and Forge
    Neo's ``sd_model.model_config.latent_format``: channels, scale and shift factors), None for a latent no decoder
    here reads (Wan's, Qwen-Image's and Krea 2's 16 channels are another VAE's; Flux.2's 128 another again)."""
    channels = getattr(latent_format, "latent_channels", None)
    scale, shift = getattr(latent_format, "scale_factor", None), getattr(latent_format, "shift_factor", 0.0)
    flux = _FAMILIES["FLUX"]
    if channels == flux.latent_channels and scale is not None and abs(scale - flux.vae_scale) < 1e-4 and \
            abs((shift or 0.0) - flux.vae_shift) < 1e-4:
        return "FLUX"
    return None


def family_key(family: str) -> str:
    """Canonical model family name ("SD1.5", "SD2", "SDXL" or "FLUX") for a loosely written one."""
    if family in _FAMILIES:
        return family
    key = _FAMILY_ALIASES.get(family.lower().replace("-", "").replace("_", "").replace(" ", ""))
    if key is None:
        raise DecoderError(f"{PREFIX}no decoder for the model family '{family}' "
                           f"(supported: {', '.join(_FAMILIES)}).", "no decoder for this model")
    return key


def private_module(module: nn.Module) -> nn.Module:
    """A gradient-capable private copy of a host module (e.g. Forge's VAE), frozen, in eval mode.

    Copies under ``inference_mode(False)`` and clones any parameter or buffer that is still an inference
    tensor, so the copy can sit on a backward path even when the host's original cannot.
    """
    with torch.inference_mode(False):
        twin = copy.deepcopy(module)
        for owner in twin.modules():
            for name, param in list(owner.named_parameters(recurse=False)):
                if param.is_inference():
                    setattr(owner, name, nn.Parameter(param.clone(), requires_grad=False))
            for name, buf in list(owner.named_buffers(recurse=False)):
                if buf is not None and buf.is_inference():
                    owner.register_buffer(name, buf.clone())
        return twin.eval().requires_grad_(False)


def shrink_latent(latent: torch.Tensor, decode_size: int | None, upscale: int) -> torch.Tensor:
    """``latent`` resized so that a decoder making ``upscale`` pixels per latent pixel gives an image whose
    shorter side is ``decode_size`` px (rounded up to whole latent pixels), aspect ratio kept. Returned as
    is when ``decode_size`` is None or the latent is not larger than that: a latent is never enlarged.

    Bicubic with antialiasing, in fp32: its adjoint spreads the gradient smoothly over the full-size latent,
    where area averaging or nearest sampling would print the resampling grid into the correction.
    """
    if decode_size is None:
        return latent
    h, w = latent.shape[-2:]
    short = -(-decode_size // upscale)
    if short >= min(h, w):
        return latent
    scale = short / min(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    resized = F.interpolate(latent.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return resized.to(latent.dtype)


class ApproxDecoder(nn.Module):
    """The hosts' linear latent -> RGB preview projection (with FLUX's bias), at latent resolution (the scorers
    resize).

    ``decode_size`` is None: the map is per pixel, so its image (64 px for a 512-px one) costs next to
    nothing to differentiate, and shrinking the latent first would only do the scorers' resize earlier.
    """

    decode_size = None

    def __init__(self, family: str = "SD1.5") -> None:
        super().__init__()
        spec = _FAMILIES[family_key(family)]
        with torch.inference_mode(False):
            self.register_buffer("coeffs", torch.tensor(spec.approx))
            self.register_buffer("bias", torch.tensor(spec.approx_bias))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("bchw,cr->brhw", latent, self.coeffs.to(latent.dtype))
        return (rgb + self.bias.to(latent.dtype)[:, None, None]) * 0.5 + 0.5


class _TaesdClamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Soft clamp to +-3, as TAESD was trained with.
        return torch.tanh(x / 3) * 3


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class _TaesdBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(),
                                  _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TaesdDecoder(nn.Sequential):
    """The TAESD decoder (madebyollin/taesd). Its state-dict keys are those of ``taesd_decoder.pth`` /
    ``taesdxl_decoder.pth`` / ``taef1_decoder.pth`` ("1.weight", "3.conv.0.weight", ...; TAEF1 reads 16 latent
    channels). Input: the diffusion latent as is; output: RGB in ~[0, 1] at 8x the resolution of the latent it
    decodes.

    decode_size: the shorter side, in pixels, of the decoded image; a larger latent is first shrunk
    (``shrink_latent``) so that TAESD decodes, and the gradient flows through, only what the encoders see.
    Default 224 (a 512x768 image is decoded at 224x336); None decodes the latent at full size.
    """

    def __init__(self, latent_channels: int = 4, decode_size: int | None = DECODE_SIZE) -> None:
        layers: list[nn.Module] = [_TaesdClamp(), _conv(latent_channels, 64), nn.ReLU()]
        for _ in range(3):
            layers += [_TaesdBlock(64, 64) for _ in range(3)]
            layers += [nn.Upsample(scale_factor=2), _conv(64, 64, bias=False)]
        layers += [_TaesdBlock(64, 64), _conv(64, 3)]
        super().__init__(*layers)
        self.decode_size = decode_size

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return super().forward(shrink_latent(latent, self.decode_size, 8))

    @classmethod
    def from_file(cls, path: str | os.PathLike, latent_channels: int = 4) -> TaesdDecoder:
        """Builds the decoder (outside inference mode) and loads a TAESD decoder state dict."""
        with torch.inference_mode(False):
            state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
            decoder = cls(latent_channels)
            decoder.load_state_dict(state)
        return decoder.eval().requires_grad_(False)


class VaeDecoder(nn.Module):
    """Wraps a host VAE decode: ``decode(latent / scale_factor + shift_factor)`` in [-1, 1] -> [0, 1].

    ``vae`` is a module with a ``decode`` method (A1111's ``first_stage_model``; on Forge pass
    ``private_module(forge_objects.vae.first_stage_model)``) or any callable taking the unscaled latent.
    The full VAE is exact but by far the slowest decoder to differentiate; it decodes the latent at full
    size (``decode_size`` None).
    """

    decode_size = None

    def __init__(self, vae: nn.Module | Callable[[torch.Tensor], torch.Tensor], scale_factor: float,
                 shift_factor: float = 0.0) -> None:
        super().__init__()
        self.vae = vae if isinstance(vae, nn.Module) else None
        self._decode = getattr(vae, "decode", vae)
        self.scale_factor = scale_factor
        self.shift_factor = shift_factor

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters(), None) if self.vae is not None else None
        z = latent / self.scale_factor + self.shift_factor
        if param is not None:
            z = z.to(param.dtype)
        return self._decode(z) * 0.5 + 0.5


def taesd_path(family: str, taesd_dir: str | os.PathLike | None) -> str | None:
    """The TAESD decoder weights file for ``family`` in ``taesd_dir`` (A1111/Forge: models/VAE-taesd),
    or None when the folder is not given or the file is not there."""
    if not taesd_dir:
        return None
    path = os.path.join(os.fspath(taesd_dir), _FAMILIES[family_key(family)].taesd_file)
    return path if os.path.isfile(path) else None


def make_decoder(kind: str, family: str, *, taesd_dir: str | os.PathLike | None = None,
                 vae: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None,
                 ) -> tuple[nn.Module, str]:
    """Builds a decoder; returns ``(decoder, kind_used)``.

    kind: "approx" (linear projection), "taesd" (needs ``taesd_dir`` holding taesd_decoder.pth,
    taesdxl_decoder.pth or, for FLUX, taef1_decoder.pth), "vae" (needs ``vae``), or "auto" (taesd when its file is
    present, else approx). family: "SD1.5", "SD2", "SDXL" or "FLUX". Raises DecoderError with a one-line message.
    """
    key = family_key(family)
    if kind == "auto":
        kind = "taesd" if taesd_path(key, taesd_dir) else "approx"
    if kind == "approx":
        return ApproxDecoder(key), kind
    if kind == "taesd":
        path = taesd_path(key, taesd_dir)
        if path is None:
            wanted = os.path.join(os.fspath(taesd_dir or "models/VAE-taesd"), _FAMILIES[key].taesd_file)
            raise DecoderError(f"{PREFIX}the TAESD decoder file {wanted} is missing; "
                               "choose decoder 'approx' or 'auto', or put the file there.", "TAESD file missing")
        try:
            return TaesdDecoder.from_file(path, _FAMILIES[key].latent_channels), kind
        except Exception as error:  # a damaged or foreign file: say which and why
            raise DecoderError(f"{PREFIX}could not load the TAESD decoder {path} ({short(error)}).",
                               "TAESD file does not load") from error
    if kind == "vae":
        if vae is None:
            raise DecoderError(f"{PREFIX}decoder 'vae' needs the model's VAE, which is not available.",
                               "no VAE for decoder 'vae'")
        return VaeDecoder(vae, _FAMILIES[key].vae_scale, _FAMILIES[key].vae_shift), kind
    raise DecoderError(f"{PREFIX}unknown decoder '{kind}' (use one of {', '.join(DECODER_KINDS)}).",
                       f"unknown decoder '{kind}'")


__all__ = ["DECODER_KINDS", "DECODE_SIZE", "ApproxDecoder", "DecoderError", "TaesdDecoder", "VaeDecoder",
           "family_key", "latent_family", "make_decoder", "private_module", "shrink_latent", "taesd_path"]
