"""The world's stand-ins for DINO and CLIP: small CNNs trained on renders of the whole world.

* identity encoder (DINO's role): trained to name the object (and its size) whatever the style, random styles
  included, so its embedding carries identity, not style;
* style encoder (CLIP-I on the style image): trained to name the style whatever the object.

Both end in a cosine classifier, so cosine similarity between embeddings is what they were trained on. Two
independently trained sets exist: the *guide* set steers generation (through the real ``Guidance`` code, in the
DINO and CLIP slots of its ``Scorers``), the *judge* set scores the results, so a method cannot win by
optimising the very network that grades it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib_dynfuse.guidance.scorers import ScorerConfig, Scorers
from lib_dynfuse.quality import world
from lib_dynfuse.quality.optim import Log, fit

KINDS = ("identity", "style")
# The classes the bundled scorers were trained on; scorers trained for more subjects or styles carry their own.
WORLD_CLASSES = {"object": world.OBJECTS, "style": world.STYLES}


def heads(kind: str, classes: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """The classifier heads of an encoder of ``kind``: objects and sizes, or styles and one more class for any
    style outside ``classes``."""
    if kind == "identity":
        return {"object": len(classes["object"]), "size": len(world.SIZES)}
    return {"style": len(classes["style"]) + 1}

_COSINE_SCALE = 12.0


class Encoder(nn.Module):
    """32×32 RGB in [0, 1] → an embedding; ``logits`` applies a cosine classifier head."""

    def __init__(self, heads: dict[str, int], width: int = 16, dim: int = 64) -> None:
        super().__init__()
        w = width

        def conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(4, c_out), nn.SiLU()]

        self.features = nn.Sequential(*conv(3, w), *conv(w, 2 * w, 2), *conv(2 * w, 2 * w), *conv(2 * w, 4 * w, 2),
                                      *conv(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, dim))
        self.heads = nn.ParameterDict({name: nn.Parameter(torch.randn(n, dim) * 0.1) for name, n in heads.items()})

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images * 2 - 1)

    def logits(self, embedding: Tensor, head: str) -> Tensor:
        return _COSINE_SCALE * F.normalize(embedding, dim=-1) @ F.normalize(self.heads[head], dim=-1).T


@dataclass
class EncoderPair:
    identity: Encoder
    style: Encoder

    def scorers(self) -> Scorers:
        """The guidance package's ``Scorers`` with the identity encoder in the DINO slot and the style encoder in
        the CLIP slot, loaded through its own factories and preprocessing (32 px in, no resize)."""
        return Scorers(ScorerConfig(device="cpu", precision="fp32"),
                       clip_factory=lambda config: _ClipSlot(self.style),
                       dino_factory=lambda config: _DinoSlot(self.identity))


class _DinoSlot(nn.Module):
    """Shaped like the timm model ``Scorers`` expects: ``pretrained_cfg`` and a forward giving features."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.pretrained_cfg = {"input_size": (3, world.SIZE, world.SIZE), "mean": (0.0,) * 3, "std": (1.0,) * 3}

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder(images)


class _ClipVisual(nn.Module):
    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.image_size = world.SIZE
        self.preprocess_cfg = {"mean": (0.0,) * 3, "std": (1.0,) * 3}


class _ClipSlot(nn.Module):
    """Shaped like the open_clip model ``Scorers`` expects: ``visual`` and ``encode_image``."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.visual = _ClipVisual(encoder)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.visual.encoder(images)


def unit_mean(embeddings: Tensor) -> Tensor:
    return F.normalize(F.normalize(embeddings, dim=-1).mean(0), dim=-1)


class Judge:
    """Scores generated images: subject identity and style (cosines to the references' mean embedding), and
    prompt fidelity (the identity encoder's probability of what the prompt says: the object, and the size when
    the prompt names one)."""

    def __init__(self, encoders: EncoderPair, subject_refs: Tensor, style_refs: Tensor, *,
                 objects: tuple[str, ...] = world.OBJECTS, subject_shape: str = world.SUBJECT) -> None:
        self.encoders = encoders
        # The prompts name the subject by its LoRA's token; the identity encoder by its shape.
        self.objects = {world.SUBJECT: objects.index(subject_shape),
                        **{o: i for i, o in enumerate(objects) if o in world.BASE_OBJECTS}}
        with torch.no_grad():
            self.subject_ref = unit_mean(encoders.identity(subject_refs))
            self.style_ref = unit_mean(encoders.style(style_refs))

    @torch.no_grad()
    def scores(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        identity = self.encoders.identity(images)
        style = self.encoders.style(images)
        objects = self.encoders.identity.logits(identity, "object").softmax(-1)
        sizes = self.encoders.identity.logits(identity, "size").softmax(-1)
        fidelity = []
        for i, prompt in enumerate(prompts):
            words = prompt.replace(",", " ").split()
            parts = [objects[i, self.objects[w]] for w in words if w in self.objects]
            parts += [sizes[i, world.SIZES.index(w)] for w in words if w in world.SIZES]
            fidelity.append(torch.stack(parts).mean() if parts else torch.tensor(float("nan")))
        return {"subject": F.normalize(identity, dim=-1) @ self.subject_ref,
                "style": F.normalize(style, dim=-1) @ self.style_ref,
                "prompt": torch.stack(fidelity)}


def _augment(images: Tensor, g: torch.Generator) -> Tensor:
    """Roughly what a sampler does to a render: blur, noise, a colour cast."""
    n = images.shape[0]
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, 1)
    mix = torch.rand(n, 1, 1, 1, generator=g) * 0.6
    x = images * (1 - mix) + blur * mix
    x = x + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.06
    x = x + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.08
    return x.clamp(0, 1)


def _training_set(kind: str, n: int, seed: int, classes: dict[str, tuple[str, ...]]) -> tuple[Tensor, dict[str, Tensor]]:
    """Half the renders in known styles, half in styles outside them: random ones and look-alikes of the known
    ones (the identity encoder learns to ignore them, the style encoder to call them "other"). The identity
    encoder learns ``classes``' objects in the world's styles, the style encoder ``classes``' styles on the world's
    objects."""
    objects, styles = (classes["object"], world.STYLES) if kind == "identity" else (world.OBJECTS, classes["style"])
    extra = {**world.random_styles(256, seed + 1), **world.near_miss_styles(styles)}
    book = {**world.STYLE_BOOK, **extra}
    half = n // 2
    scenes = (world.random_scenes(half, seed, objects, styles)
              + world.random_scenes(n - half, seed + 2, objects, tuple(extra)))
    images = world.render_many(scenes, book)
    if kind == "identity":
        labels = {"object": torch.tensor([objects.index(s.object) for s in scenes]),
                  "size": torch.tensor([world.SIZES.index(s.size) for s in scenes])}
    else:
        labels = {"style": torch.tensor([styles.index(s.style) if s.style in styles else len(styles)
                                         for s in scenes])}
    return images, labels


def train_encoder(kind: str, *, seed: int, steps: int, width: int = 16, batch: int = 128, pool: int = 8000,
                  lr: float = 1e-3, classes: dict[str, tuple[str, ...]] = WORLD_CLASSES, log: Log = print) -> Encoder:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = _training_set(kind, pool, seed, classes)
    encoder = Encoder(heads(kind, classes), width)

    def loss_at(step: int) -> Tensor:
        index = torch.randint(pool, (batch,), generator=g)
        embedding = encoder(_augment(images[index], g))
        return sum(F.cross_entropy(encoder.logits(embedding, head), y[index]) for head, y in labels.items())

    fit(encoder.parameters(), loss_at, steps=steps, lr=lr, label=f"{kind} encoder (seed {seed})", log=log,
        weight_decay=1e-4)
    return encoder.eval().requires_grad_(False)
