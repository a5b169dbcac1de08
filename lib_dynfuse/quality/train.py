"""Training of the world model: the base text encoder and UNet on the base world (seeded, CPU)."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lib_dynfuse.quality import world
from lib_dynfuse.quality.diffusion import to_model_space, v_loss
from lib_dynfuse.quality.optim import Log, fit
from lib_dynfuse.quality.text import TextEncoder, tokenize
from lib_dynfuse.quality.unet import UNet2DConditionModel, UNetConfig


def captions_for(scenes: list[world.Scene], generator: torch.Generator, *, size_rate: float = 0.7,
                 drop_rate: float = 0.1) -> list[str]:
    """Captions with the size word in ``size_rate`` of them and ``drop_rate`` empty (for classifier-free
    guidance)."""
    u = torch.rand(len(scenes), 2, generator=generator).tolist()
    return ["" if drop < drop_rate else scene.caption(with_size=keep < size_rate)
            for scene, (keep, drop) in zip(scenes, u)]


class Ema:
    """Exponential moving average of a module's weights, with the usual warm-up of the decay."""

    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow.parameters(), module.parameters()):
            s.lerp_(p.detach(), 1 - d)


def train_base(*, steps: int, seed: int = 0, batch: int = 64, pool: int = 24000, lr: float = 2e-3,
               config: UNetConfig | None = None, log: Log = print) -> tuple[TextEncoder, UNet2DConditionModel]:
    """The base model, trained from scratch on ``pool`` renders of the base world (no ``sks``, no ``zwx``);
    returns the exponential moving averages of the weights."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    scenes = world.random_scenes(pool, seed)
    images = to_model_space(world.render_many(scenes))
    text, unet = TextEncoder(), UNet2DConditionModel(config or UNetConfig())
    ema_text, ema_unet = Ema(text), Ema(unet)

    def loss_at(step: int) -> Tensor:
        index = torch.randint(pool, (batch,), generator=g)
        captions = captions_for([scenes[i] for i in index.tolist()], g)
        return v_loss(unet, images[index], text(tokenize(captions)), g).mean()

    def average() -> None:
        ema_text.update(text)
        ema_unet.update(unet)

    fit(list(text.parameters()) + list(unet.parameters()), loss_at, steps=steps, lr=lr, label="base", log=log,
        warmup=min(200, steps // 10 + 1), clip=1.0, after_step=average)
    return ema_text.shadow, ema_unet.shadow


@dataclass(frozen=True)
class Recipe:
    """How long each part trains; the defaults are the bundled weights' recipe."""

    seed: int = 0
    base_steps: int = 3000
    base_pool: int = 24000
    subject_steps: int = 800  # until the hole in the heart comes out at weight 1
    style_steps: int = 400  # more only pushes the style further past its look at weight 1
    lora_lr: float = 1e-3
    subject_rank: int = 8
    subject_alpha: float = 4.0
    style_rank: int = 8
    style_alpha: float = 8.0
    identity_steps: int = 800
    style_encoder_steps: int = 600


PARTS = ("base", "loras", "scorers")


def retrain(folder: str | os.PathLike, recipe: Recipe = Recipe(), log: Log = print,
            parts: tuple[str, ...] = PARTS) -> None:
    """The base model, the two LoRA files (trained on the base in ``folder``) and both scorer sets, seeded; each
    part depends only on its seed and the parts before it."""
    from lib_dynfuse.quality import model, scorers

    os.makedirs(folder, exist_ok=True)
    start = time.time()
    if "base" in parts:
        text, unet = train_base(steps=recipe.base_steps, seed=recipe.seed, pool=recipe.base_pool, log=log)
        model.save_model(text, unet, os.path.join(folder, model.MODEL_FILE))
    if "loras" in parts:
        _train_loras(folder, recipe, log)
    if "scorers" in parts:
        sets = {}
        for offset, name in enumerate(model.SCORER_SETS):
            seed = recipe.seed + 10 * (offset + 1)
            sets[name] = scorers.EncoderPair(
                scorers.train_encoder("identity", seed=seed, steps=recipe.identity_steps, log=log),
                scorers.train_encoder("style", seed=seed, steps=recipe.style_encoder_steps, log=log))
        model.save_scorers(sets, os.path.join(folder, model.SCORERS_FILE))
    log(f"retrained {', '.join(parts)} in {folder} in {(time.time() - start) / 60:.1f} min")


def _train_loras(folder: str | os.PathLike, recipe: Recipe, log: Log) -> None:
    from lib_dynfuse.quality import model
    from lib_dynfuse.quality.lora import save_kohya, train_lora

    # The LoRAs train on the base as it is stored (fp16 rounding included), as users train on a released model.
    base_text, base_unet = model.load_base(folder)
    for label, scenes, file, rank, alpha, steps, seed in (
            ("subject LoRA", model.subject_scenes(), model.SUBJECT_FILE, recipe.subject_rank, recipe.subject_alpha,
             recipe.subject_steps, 1),
            ("style LoRA", model.style_scenes(), model.STYLE_FILE, recipe.style_rank, recipe.style_alpha,
             recipe.style_steps, 2)):
        captions = model.training_captions(scenes)
        with torch.no_grad():
            context = base_text.encode(captions)
        lora = train_lora(base_unet, context, to_model_space(world.render(scenes)), rank=rank, alpha=alpha,
                          steps=steps, lr=recipe.lora_lr, seed=recipe.seed + seed, label=label, log=log)
        save_kohya(lora, os.path.join(folder, file), captions=captions)
