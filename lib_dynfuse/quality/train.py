"""Training of the world model: the base text encoder and UNet on the base world (seeded, CPU)."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path

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
    """How long the base and the scorers train; the defaults are the bundled weights' recipe (each pair's LoRAs
    have their own recipe in the registry, lib_dynfuse.quality.pairs)."""

    seed: int = 0
    base_steps: int = 3000
    base_pool: int = 24000
    identity_steps: int = 800
    style_encoder_steps: int = 600
    scorer_pool: int = 8000  # renders each scorer trains on


PARTS = ("base", "loras", "scorers")


def retrain(folder: str | os.PathLike, recipe: Recipe = Recipe(), log: Log = print,
            parts: tuple[str, ...] = PARTS) -> None:
    """The base model, every bundled pair's LoRA files (trained on the base in ``folder``) and both scorer sets,
    seeded; each part depends only on its seed and the parts before it."""
    from lib_dynfuse.quality import model, pairs

    os.makedirs(folder, exist_ok=True)
    start = time.time()
    if "base" in parts:
        text, unet = train_base(steps=recipe.base_steps, seed=recipe.seed, pool=recipe.base_pool, log=log)
        model.save_model(text, unet, os.path.join(folder, model.MODEL_FILE))
    if "loras" in parts:
        for pair in pairs.PAIRS.values():
            if pair.bundled:
                ensure_pair_loras(pair, folder, folder, log=log, again=True)
    if "scorers" in parts:
        train_scorers(os.path.join(folder, model.SCORERS_FILE), pairs.scorer_classes(), recipe, log=log)
    log(f"retrained {', '.join(parts)} in {folder} in {(time.time() - start) / 60:.1f} min")


def train_scorers(path: str | os.PathLike, classes: dict[str, tuple[str, ...]], recipe: Recipe = Recipe(),
                  log: Log = print, keep: str | os.PathLike | None = None) -> None:
    """Both scorer sets (guide and judge, each from its own seed) for ``classes``, saved to ``path``. ``keep``: a
    scorer file whose identity encoders are kept when they know the same objects (only the style encoders train)."""
    from lib_dynfuse.quality import model, scorers

    kept = model.load_scorers(keep) if keep is not None else None
    if kept is not None and kept[1]["object"] != classes["object"]:
        kept = None
    sets = {}
    for offset, name in enumerate(model.SCORER_SETS):
        seed = recipe.seed + 10 * (offset + 1)
        identity = kept[0][name].identity if kept else scorers.train_encoder(
            "identity", seed=seed, steps=recipe.identity_steps, pool=recipe.scorer_pool, classes=classes, log=log)
        sets[name] = scorers.EncoderPair(identity, scorers.train_encoder(
            "style", seed=seed, steps=recipe.style_encoder_steps, pool=recipe.scorer_pool, classes=classes, log=log))
    model.save_scorers(sets, path, classes)


def lora_files(pair, folder: str | os.PathLike) -> tuple[Path, Path]:
    """Where a pair's two LoRA files are: the original pair's LoRAs (``sks`` and ``zwx``) at the top of
    ``folder``, any other in ``folder/pairs``."""
    from lib_dynfuse.quality import model, pairs

    folder, original = Path(folder), pairs.PAIRS[pairs.ORIGINAL]
    same_subject = (pair.subject, pair.subject_lora) == (original.subject, original.subject_lora)
    same_style = (pair.style, pair.style_lora) == (original.style, original.style_lora)
    return (folder / model.SUBJECT_FILE if same_subject else folder / "pairs" / pair.subject_file(),
            folder / model.STYLE_FILE if same_style else folder / "pairs" / pair.style_file())


def ensure_pair_loras(pair, folder: str | os.PathLike, base_folder: str | os.PathLike, log: Log = print,
                      again: bool = False, roles: tuple[str, ...] = ("subject", "style")) -> tuple[Path, Path]:
    """The pair's two LoRA files in ``folder``, those of ``roles`` trained (seeded, on the base model in
    ``base_folder``) if they are missing or ``again``."""
    from lib_dynfuse.quality import model, pairs
    from lib_dynfuse.quality.lora import save_kohya, train_lora

    subject_path, style_path = lora_files(pair, folder)
    jobs = [(path, role) for path, role in ((subject_path, "subject"), (style_path, "style"))
            if role in roles and (again or not path.is_file())]
    if jobs:
        # The LoRAs train on the base as it is stored (fp16 rounding included), as users train on a released model.
        base_text, base_unet = model.load_base(base_folder)
    for path, role in jobs:
        recipe = pair.subject_lora if role == "subject" else pair.style_lora
        scenes = pair.subject_scenes() if role == "subject" else pair.style_scenes()
        captions = lora_captions(scenes, role)
        with torch.no_grad():
            context = base_text.encode(captions)
        lora = train_lora(base_unet, context, to_model_space(world.render(scenes)), rank=recipe.rank,
                          alpha=recipe.alpha, steps=recipe.steps, lr=recipe.lr, seed=recipe.seed,
                          label=f"{pair.name} {role} LoRA", log=log, targets=pairs.LAYER_SETS[recipe.layers])
        path.parent.mkdir(parents=True, exist_ok=True)
        save_kohya(lora, path, captions=captions)
    return subject_path, style_path


def lora_captions(scenes: list[world.Scene], role: str) -> list[str]:
    """The training captions: the subject named by its token in its plain renders, the objects in the style's
    token; every other caption without the size word."""
    from lib_dynfuse.quality.pairs import STYLE_TOKEN, SUBJECT_TOKEN

    return [world.caption(SUBJECT_TOKEN if role == "subject" else s.object,
                          s.style if role == "subject" else STYLE_TOKEN, s.size if i % 2 == 0 else None)
            for i, s in enumerate(scenes)]
