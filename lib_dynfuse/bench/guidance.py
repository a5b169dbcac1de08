"""Benchmark, not a test: the cost of one guided step against one UNet step at SD1.5 shapes.

A guided step is what ``Guidance.correct`` does at an active step: decode the x0 estimate (TAESD at its
``decode_size``, the others at latent size), embed it with CLIP ViT-B-32 and DINO ViT-S/16, and backpropagate
to x0. All models have random weights (the cost does
not depend on the values). Called by ``python -m lib_dynfuse.bench --guidance``.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lib_dynfuse.guidance.correction import Guidance, GuidanceParams
from lib_dynfuse.guidance.decoders import ApproxDecoder, TaesdDecoder, VaeDecoder
from lib_dynfuse.guidance.scorers import ScorerConfig, Scorers, unload

# diffusers' AutoencoderKL with the SD1.5 VAE configuration (random weights).
_SD15_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
             "sample_size": 512, "block_out_channels": (128, 256, 512, 512),
             "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}


def _random_clip(config: ScorerConfig) -> nn.Module:
    import open_clip

    return open_clip.create_model(config.clip_model, pretrained=None)


def _random_dino(config: ScorerConfig) -> nn.Module:
    import timm

    return timm.create_model(config.dino_model, pretrained=False, num_classes=0)


def _decoder(kind: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    if kind == "approx":
        return ApproxDecoder("SD1.5")
    if kind == "taesd":
        return TaesdDecoder().eval().requires_grad_(False)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**_SD15_VAE).to(device, dtype).eval().requires_grad_(False)

    class _Decode(nn.Module):  # diffusers returns a DecoderOutput; the hosts' decode returns the tensor
        def __init__(self) -> None:
            super().__init__()
            self.inner = vae

        def decode(self, z: torch.Tensor) -> torch.Tensor:
            return self.inner.decode(z).sample

    return VaeDecoder(_Decode(), 0.18215)


def _median_seconds(calls: dict[str, Callable[[], object]], device: str, repeats: int,
                    once: frozenset[str] = frozenset()) -> dict[str, float]:
    """Median wall time of each call after one warm-up, under no_grad as in the hosts' sampling loops.

    Rounds interleave the calls, so a load change on the machine shifts all of them alike rather than
    one; the calls in ``once`` are timed in the first round only.
    """
    def timed(call: Callable[[], object]) -> float:
        start = time.perf_counter()
        call()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():
            call()
        for round_ in range(repeats):
            for name, call in calls.items():
                if round_ == 0 or name not in once:
                    times[name].append(timed(call))
    return {name: statistics.median(values) for name, values in times.items()}


_PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def run(decoders: tuple[str, ...] = ("approx", "taesd", "vae"), size: int = 512, device: str | None = None,
        repeats: int = 3, dtype: torch.dtype | None = None) -> dict:
    """Times one guided step per decoder and one SD1.5 UNet step (batch 2: one image with CFG), the encoders and
    the UNet in ``dtype`` (default: fp16 on CUDA, fp32 elsewhere).

    Returns ``{"guided_step_over_unet_step": {decoder: ratio}, "guided_step_s": {...}, "unet_step_s": s,
    "decode_size": {decoder: its decode_size}, "decoded_image": {decoder: [h, w]}, "device": ...,
    "dtype": ..., "latent": [1, 4, h, w], "repeats": n}``; ``decoded_image`` is the size of the image the
    decoder made for the encoders.
    """
    from lib_dynfuse.bench.unets import build_unet

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = ScorerConfig(device=device, precision=_PRECISIONS[dtype] if dtype is not None else "auto")
    dtype = config.torch_dtype()
    scorers = Scorers(config, clip_factory=_random_clip, dino_factory=_random_dino)
    generator = torch.Generator().manual_seed(0)
    latent = size // 8
    x0 = torch.randn(1, 4, latent, latent, generator=generator).to(device)
    uncond = x0 + 0.1 * torch.randn(x0.shape, generator=generator).to(device)
    subject = torch.rand(1, 3, 224, 224, generator=generator)
    params = GuidanceParams(strength=0.2, balance=0.5, start=0.0, end=1.0)
    refs = [_pil(subject)]

    guidances: dict[str, Guidance] = {}
    decoded: dict[str, list[int]] = {}
    try:
        for kind in decoders:
            decoder = _decoder(kind, torch.device(device), dtype)
            decoder.register_forward_hook(
                lambda _module, _inputs, image, kind=kind: decoded.__setitem__(kind, list(image.shape[-2:])))
            guidances[kind] = Guidance(decoder, scorers, params, subject_refs=refs, style_ref=refs[0],
                                       decoder_kind=kind, log=lambda _: None)
        unet = build_unet("sd15", device=device, dtype=dtype)
        inputs = {"sample": torch.randn(2, 4, latent, latent, generator=generator).to(device, dtype),
                  "timestep": torch.tensor(500, device=device),
                  "encoder_hidden_states": torch.randn(2, 77, 768, generator=generator).to(device, dtype)}
        calls: dict[str, Callable[[], object]] = {
            kind: lambda g=guidance: g.correct(x0, uncond, progress=0.5, step=0)
            for kind, guidance in guidances.items()}
        calls["unet"] = lambda: unet(**inputs)
        seconds = _median_seconds(calls, device, repeats,
                                  once=frozenset({"vae"}) if device == "cpu" else frozenset())
        for guidance in guidances.values():
            if guidance.messages:
                raise RuntimeError(guidance.messages[0])
    finally:
        unload()
    unet_s = seconds.pop("unet")
    return {
        "guided_step_over_unet_step": {k: round(v / unet_s, 3) for k, v in seconds.items()},
        "guided_step_s": {k: round(v, 4) for k, v in seconds.items()},
        "unet_step_s": round(unet_s, 4),
        "decode_size": {k: g.decoder.decode_size for k, g in guidances.items()},
        "decoded_image": decoded,
        "device": device, "dtype": str(dtype).replace("torch.", ""), "latent": [1, 4, latent, latent],
        "encoders": "open_clip ViT-B-32 + timm vit_small_patch16_224.dino, random weights",
        "repeats": repeats, "threads": torch.get_num_threads(),
    }


def _pil(pixels: torch.Tensor):
    from PIL import Image

    array = (pixels[0].permute(1, 2, 0).clamp(0, 1) * 255).to(torch.uint8).numpy()
    return Image.fromarray(array)
