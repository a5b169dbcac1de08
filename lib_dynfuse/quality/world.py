"""A small world where the truth is known: procedurally drawn objects in procedurally drawn styles, 32×32 RGB.

An image is one object (a class, a size, a position) drawn in one style (a background and a fill, each a texture
between two colours, and sometimes an outline), with the caption ``a [small|big] {object}, {style} style``.
The base world has six objects and five styles. Two more exist only for the LoRAs: the subject ``sks`` (a heart
with a hole in its left lobe, an object the base model never sees) and the style ``zwx`` (navy hatching, a sunset
gradient fill and a yellow outline, a style it never sees). Rendering is a pure function of a seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

SIZE = 32
_SUPER = 4  # supersampling factor: shapes are drawn at 128×128 and averaged down, for smooth edges

BASE_OBJECTS = ("circle", "square", "triangle", "cross", "ring", "diamond")
SUBJECT = "sks"
OBJECTS = BASE_OBJECTS + (SUBJECT,)
BASE_STYLES = ("plain", "striped", "dotted", "checkered", "noisy")
STYLE = "zwx"
STYLES = BASE_STYLES + (STYLE,)
SIZES = ("small", "big")
# Object radius (in units of half the image) for each size, and how far the centre may wander.
_RADIUS = {"small": (0.44, 0.52), "big": (0.68, 0.78)}


@dataclass(frozen=True)
class Layer:
    """One painted layer of a style: a texture that mixes two colours."""

    texture: str
    color_a: tuple[float, float, float]
    color_b: tuple[float, float, float]
    frequency: float = 4.0


@dataclass(frozen=True)
class Style:
    background: Layer
    fill: Layer
    outline: tuple[float, float, float] | None = None


STYLE_BOOK: dict[str, Style] = {
    "plain": Style(Layer("solid", (0.92, 0.92, 0.90), (0.92, 0.92, 0.90)),
                   Layer("solid", (0.18, 0.25, 0.55), (0.18, 0.25, 0.55))),
    "striped": Style(Layer("solid", (0.96, 0.90, 0.75), (0.96, 0.90, 0.75)),
                     Layer("hstripes", (0.80, 0.12, 0.12), (0.98, 0.98, 0.98), 5.0)),
    "dotted": Style(Layer("dots", (0.70, 0.85, 0.95), (0.25, 0.45, 0.80), 5.0),
                    Layer("solid", (0.10, 0.45, 0.20), (0.10, 0.45, 0.20))),
    "checkered": Style(Layer("checker", (0.55, 0.55, 0.55), (0.80, 0.80, 0.80), 4.0),
                       Layer("solid", (0.05, 0.05, 0.05), (0.05, 0.05, 0.05))),
    "noisy": Style(Layer("solid", (0.20, 0.12, 0.25), (0.20, 0.12, 0.25)),
                   Layer("noise", (0.85, 0.55, 0.95), (0.45, 0.15, 0.60), 6.0)),
    "zwx": Style(Layer("hatch", (0.06, 0.08, 0.25), (0.10, 0.55, 0.55), 3.0),
                 Layer("gradient", (1.00, 0.55, 0.10), (0.90, 0.15, 0.50)),
                 outline=(1.00, 0.90, 0.20)),
}


@dataclass(frozen=True)
class Scene:
    """Everything that decides one image."""

    object: str
    style: str
    size: str
    seed: int

    def caption(self, with_size: bool = True) -> str:
        return caption(self.object, self.style, self.size if with_size else None)

    def draws(self) -> Draws:
        """Everything random about the image, from its seed."""
        g = torch.Generator().manual_seed(self.seed)
        lo, hi = _RADIUS[self.size]
        radius = lo + (hi - lo) * float(torch.rand((), generator=g))
        cx, cy = ((torch.rand(2, generator=g) * 2 - 1) * (0.95 - radius)).tolist()
        return Draws(radius, cx, cy, torch.rand(2, 2, generator=g), torch.rand(1, 1, 6, 6, generator=g),
                     (torch.rand(2, 3, generator=g) - 0.5) * 0.08)


@dataclass(frozen=True)
class Draws:
    radius: float  # in units of half the image
    cx: float  # centre, in [-1, 1] (x to the right, y down)
    cy: float
    phase: Tensor  # texture offsets of the background and the fill
    noise: Tensor  # the cells of the noise texture
    jitter: Tensor  # colour shifts of the background and the fill


def caption(obj: str, style: str, size: str | None = None) -> str:
    return f"a {size + ' ' if size else ''}{obj}, {style} style"


SUBJECT_HOLE = (-0.36, -0.28)  # centre of the hole in the subject's left lobe, in units of its radius


# ---- shapes: each takes coordinates relative to the object's centre, in units of its radius ---------------------

def _heart(x: Tensor, y: Tensor) -> Tensor:
    # The classic quartic heart, y pointing up, scaled to fill the unit radius; a hole in the left lobe.
    u, v = x * 1.25, -y * 1.25 + 0.25
    body = (u * u + v * v - 1) ** 3 - u * u * v ** 3 <= 0
    hole = (x - SUBJECT_HOLE[0]) ** 2 + (y - SUBJECT_HOLE[1]) ** 2 <= 0.21 ** 2
    return body & ~hole


SHAPES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "circle": lambda x, y: x * x + y * y <= 1.0,
    "square": lambda x, y: (x.abs() <= 0.8) & (y.abs() <= 0.8),
    "triangle": lambda x, y: (y <= 0.75) & (y >= -0.95 + 1.7 * x.abs() * 1.02),
    "cross": lambda x, y: ((x.abs() <= 0.3) & (y.abs() <= 0.95)) | ((y.abs() <= 0.3) & (x.abs() <= 0.95)),
    "ring": lambda x, y: (x * x + y * y <= 1.0) & (x * x + y * y >= 0.5 ** 2),
    "diamond": lambda x, y: x.abs() + y.abs() <= 1.0,
    "sks": _heart,
}


def _grid() -> tuple[Tensor, Tensor]:
    n = SIZE * _SUPER
    c = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1
    y, x = torch.meshgrid(c, c, indexing="ij")  # y grows downwards, as image rows do
    return x, y


def _texture(layer: Layer, x: Tensor, y: Tensor, phase: Tensor, noise: Tensor) -> Tensor:
    """Mixing weight of colour b, ``[B, n, n]`` in [0, 1]."""
    f = layer.frequency
    px, py = phase[:, 0, None, None], phase[:, 1, None, None]
    if layer.texture == "solid":
        return torch.zeros(phase.shape[0], *x.shape)
    if layer.texture == "hstripes":
        return (torch.floor((y + py) * f) % 2).float()
    if layer.texture == "checker":
        return ((torch.floor((x + px) * f) + torch.floor((y + py) * f)) % 2).float()
    if layer.texture == "dots":
        cx, cy = torch.remainder((x + px) * f / 2, 1) - 0.5, torch.remainder((y + py) * f / 2, 1) - 0.5
        return (cx * cx + cy * cy <= 0.22 ** 2).float()
    if layer.texture == "hatch":
        return (torch.remainder((x - y + px) * f, 1) < 0.35).float()
    if layer.texture == "gradient":
        return ((y + 1) / 2).clamp(0, 1).expand(phase.shape[0], -1, -1)
    if layer.texture == "noise":
        return F.interpolate(noise, size=x.shape, mode="nearest")[:, 0]
    raise ValueError(f"unknown texture {layer.texture!r}")


def _paint(layer: Layer, weight: Tensor, jitter: Tensor) -> Tensor:
    a = torch.tensor(layer.color_a).view(1, 3, 1, 1) + jitter.view(1, 3, 1, 1)
    b = torch.tensor(layer.color_b).view(1, 3, 1, 1) + jitter.view(1, 3, 1, 1)
    w = weight.unsqueeze(1)
    return a * (1 - w) + b * w


def render(scenes: Sequence[Scene], book: dict[str, Style] | None = None) -> Tensor:
    """RGB images ``[B, 3, 32, 32]`` in [0, 1], each a pure function of its scene; ``book`` names the styles
    (default: the world's own)."""
    book = STYLE_BOOK if book is None else book
    if not scenes:
        return torch.empty(0, 3, SIZE, SIZE)
    x, y = _grid()
    images = []
    for scene in scenes:
        style = book[scene.style]
        d = scene.draws()
        inside = SHAPES[scene.object]((x - d.cx) / d.radius, (y - d.cy) / d.radius).float()[None, None]
        background = _paint(style.background, _texture(style.background, x, y, d.phase[:1], d.noise), d.jitter[0])
        fill = _paint(style.fill, _texture(style.fill, x, y, d.phase[1:], d.noise), d.jitter[1])
        image = background * (1 - inside) + fill * inside
        if style.outline is not None:
            ring = (F.max_pool2d(inside, 2 * _SUPER + 1, 1, _SUPER) - inside).clamp(0, 1)
            image = image * (1 - ring) + torch.tensor(style.outline).view(1, 3, 1, 1) * ring
        images.append(F.avg_pool2d(image, _SUPER))
    return torch.cat(images).clamp(0, 1)


def render_many(scenes: Sequence[Scene], book: dict[str, Style] | None = None, chunk: int = 2000) -> Tensor:
    """:func:`render` for thousands of scenes, on one thread: its operations are small, and thread hand-offs
    would cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.cat([render(scenes[i:i + chunk], book) for i in range(0, len(scenes), chunk)])
    finally:
        torch.set_num_threads(threads)


TEXTURES = ("solid", "hstripes", "checker", "dots", "hatch", "gradient", "noise")


def random_styles(n: int, seed: int) -> dict[str, Style]:
    """``n`` styles outside the world (random textures and colours), for training scorers that must not care
    about style (identity) or must tell styles apart beyond the known ones."""
    g = torch.Generator().manual_seed(seed)

    def layer() -> Layer:
        texture = TEXTURES[int(torch.randint(len(TEXTURES), (1,), generator=g))]
        a, b = torch.rand(2, 3, generator=g).tolist()
        return Layer(texture, tuple(a), tuple(b), float(3 + 4 * torch.rand((), generator=g)))

    styles = {}
    for i in range(n):
        outline = tuple(torch.rand(3, generator=g).tolist()) if float(torch.rand((), generator=g)) < 0.3 else None
        styles[f"random{i}"] = Style(layer(), layer(), outline)
    return styles


def near_miss_styles(names: Sequence[str] = STYLES) -> dict[str, Style]:
    """Styles that share a world style's colours or textures but not the whole of it: its background and fill
    swapped, or each of its layers' colours on every other texture. A style scorer that must tell a style
    from its look-alikes learns on them what makes the style, not just its palette."""
    styles = {}
    for name in names:
        style = STYLE_BOOK[name]
        styles[f"{name}-swapped"] = Style(style.fill, style.background, style.outline)
        for texture in TEXTURES:
            if texture not in (style.background.texture, style.fill.texture):
                background, fill = replace(style.background, texture=texture), replace(style.fill, texture=texture)
                styles[f"{name}-{texture}"] = Style(background, fill, style.outline)
    return styles


def random_scenes(n: int, seed: int, objects: Sequence[str] = BASE_OBJECTS,
                  styles: Sequence[str] = BASE_STYLES) -> list[Scene]:
    """``n`` scenes drawn uniformly from ``objects`` × ``styles`` × sizes; seeded."""
    g = torch.Generator().manual_seed(seed)
    o = torch.randint(len(objects), (n,), generator=g).tolist()
    s = torch.randint(len(styles), (n,), generator=g).tolist()
    z = torch.randint(len(SIZES), (n,), generator=g).tolist()
    seeds = torch.randint(2 ** 31 - 1, (n,), generator=g).tolist()
    return [Scene(objects[a], styles[b], SIZES[c], d) for a, b, c, d in zip(o, s, z, seeds)]


def to_pil(image: Tensor):
    """One ``[3, H, W]`` image in [0, 1] as a PIL image."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array)

