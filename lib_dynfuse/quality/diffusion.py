"""Noise schedule, training loss and the DDIM sampler of the world model.

The model works on the pixels folded 2×2 into channels (``[B, 12, 16, 16]`` in [-1, 1] for a 32×32 image): a
lossless rearrangement, so the "decoder" that guidance differentiates through is a pixel shuffle. The UNet
predicts v (Salimans & Ho 2022) on a cosine schedule of 1000 steps.

The sampler runs classifier-free guidance the way AUTOMATIC1111 batches it (every image's conditional row, then
every image's unconditional row, ``BatchLayout.a1111``), tells a fusion session the sampler's own step, and hands
the after-CFG x0 estimate to the real guidance correction (``Guidance.correct``), as the hosts do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib_dynfuse.engine.layout import BatchLayout, StepClock

TRAIN_STEPS = 1000
FOLD = 2


def alpha_bar(t: Tensor) -> Tensor:
    """ᾱ at integer timesteps ``t`` in [0, 1000): the cosine schedule, kept away from 0 and 1."""
    s = 0.008
    f = torch.cos(((t.float() + 1) / TRAIN_STEPS + s) / (1 + s) * math.pi / 2) ** 2
    return f.clamp(1e-4, 0.9999)


def to_model_space(images: Tensor) -> Tensor:
    """RGB ``[B, 3, 32, 32]`` in [0, 1] → the model's ``[B, 12, 16, 16]`` in [-1, 1]."""
    return F.pixel_unshuffle(images * 2 - 1, FOLD)


def to_pixels(z: Tensor) -> Tensor:
    """The inverse of :func:`to_model_space` (not clamped: guidance needs the gradient of every pixel)."""
    return F.pixel_shuffle(z, FOLD) * 0.5 + 0.5


class PixelDecoder(nn.Module):
    """The guidance decoder of this world: model space → RGB in [0, 1]; a rearrangement, nothing learned."""

    def forward(self, z: Tensor) -> Tensor:
        return to_pixels(z)


def v_loss(unet: nn.Module, x0: Tensor, context: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The v-prediction loss at uniformly drawn timesteps, per sample ``[B]``."""
    t = torch.randint(0, TRAIN_STEPS, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = alpha_bar(t).view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    return (unet(x_t, t, context) - v).pow(2).flatten(1).mean(1)


def sampling_timesteps(steps: int) -> list[int]:
    """``steps`` timesteps from the noisiest down, evenly spaced (DDIM's "trailing" spacing)."""
    return [round(TRAIN_STEPS - 1 - i * TRAIN_STEPS / steps) for i in range(steps)]


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...] = (12, 16, 16)) -> Tensor:
    """One noise image per seed: an image depends on its own seed only, not on the batch it is made in."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample(unet: nn.Module, context: Tensor, uncond: Tensor, seeds: Sequence[int], *, steps: int = 20,
           cfg_scale: float = 1.5, session=None, guidance=None) -> Tensor:
    """DDIM (η = 0) with CFG; returns RGB ``[B, 3, 32, 32]`` in [0, 1].

    ``context``/``uncond``: text-encoder states ``[B, 8, W]`` of the prompts and of the empty prompt.
    ``session``: a :class:`~lib_dynfuse.engine.session.FusionSession` (installed by the caller) that is told the batch
    layout and each step. ``guidance``: a :class:`~lib_dynfuse.guidance.Guidance` whose ``correct`` nudges the
    after-CFG x0 estimate.
    """
    n = len(seeds)
    x = initial_noise(seeds).to(context.device)
    both = torch.cat([context, uncond])
    timesteps = sampling_timesteps(steps)
    if session is not None:
        session.set_layout(BatchLayout.a1111(n))
    for i, t in enumerate(timesteps):
        clock = StepClock(i, steps)
        if session is not None:
            session.set_step(clock)
        a = alpha_bar(torch.tensor(t))
        v = unet(torch.cat([x, x]), torch.tensor(t), both)
        x0_cond, x0_uncond = (a.sqrt() * torch.cat([x, x]) - (1 - a).sqrt() * v).chunk(2)
        x0 = x0_uncond + cfg_scale * (x0_cond - x0_uncond)
        if guidance is not None:
            x0 = guidance.correct(x0, x0_uncond, progress=clock.progress, step=i)
        x0 = x0.clamp(-1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        a_next = alpha_bar(torch.tensor(timesteps[i + 1])) if i + 1 < steps else torch.tensor(1.0)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return to_pixels(x).clamp(0, 1)
