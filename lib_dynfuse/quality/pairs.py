"""The registry of subjects, styles and LoRA pairs the quality comparison runs on.

A *subject* is a shape (one with an identity-defining detail, like the heart's hole, or a plain one), taught to the
token ``sks`` by a subject LoRA trained on six renders of it in the plain style. A *style* is a style-book entry,
taught to the token ``zwx`` by a style LoRA trained on eight base objects drawn in it. A *pair* is a subject, a
style and a recipe for each LoRA (rank, alpha, steps, learning rate, which layers, seed), so that one world can
hold LoRAs as different as users meet: loud or quiet, on attention only or on attention and feed-forward.

A pair file (``python -m lib_dynfuse.bench --quality --pair-file my_pairs.py``) is Python that calls this module's
public functions::

    from lib_dynfuse.quality.pairs import LoraRecipe, Layer, Style, add_pair, add_shape, add_style, add_subject

    add_shape("moon", lambda x, y: (x * x + y * y <= 1) & ((x - 0.45) ** 2 + y * y > 0.7 ** 2))
    add_subject("moon", shape="moon")
    add_style("ember", Style(Layer("solid", (0.1, 0.05, 0.05), (0.1, 0.05, 0.05)),
                             Layer("dots", (0.95, 0.4, 0.1), (1.0, 0.85, 0.3), 6.0)))
    add_pair("moon-ember", "moon", "ember", subject_lora=LoraRecipe(alpha=8, steps=400, seed=11),
             style_lora=LoraRecipe(alpha=8, steps=300, layers="attn", seed=12))

Shapes take coordinates relative to the object's centre in units of its radius (x to the right, y down) and return
a boolean mask. A subject or style the bundled scorers do not know makes the comparison train its own scorers.
"""

from __future__ import annotations

import hashlib
import os
import runpy
from collections.abc import Callable
from dataclasses import asdict, dataclass

from torch import Tensor

from lib_dynfuse.quality import world
from lib_dynfuse.quality.world import Layer, Style

__all__ = ["LoraRecipe", "Layer", "Style", "Subject", "Pair", "add_shape", "add_subject", "add_style", "add_pair",
           "load_pair_file", "SUBJECTS", "STYLES", "PAIRS"]

LAYER_SETS = {"attn": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                       "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
              "attn+ff": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                          "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")}
SUBJECT_TOKEN, STYLE_TOKEN = world.SUBJECT, world.STYLE  # the words the LoRAs teach, in every pair's prompts


@dataclass(frozen=True)
class LoraRecipe:
    """How one LoRA trains: kohya's rank and alpha (the delta's scale is alpha / rank), AdamW steps at ``lr`` on
    a cosine schedule, the transformer-block linears it touches (``layers``: ``attn`` or ``attn+ff``), its seed."""

    rank: int = 8
    alpha: float = 8.0
    steps: int = 400
    lr: float = 1e-3
    layers: str = "attn+ff"
    seed: int = 1

    def __post_init__(self) -> None:
        if self.layers not in LAYER_SETS:
            raise ValueError(f"LoRA layers {self.layers!r}: one of {', '.join(LAYER_SETS)}")
        if self.rank < 1 or self.steps < 0 or self.alpha <= 0 or self.lr <= 0:
            raise ValueError(f"invalid LoRA recipe {self}")

    def tag(self) -> str:
        """A short name of the recipe, for file names."""
        return hashlib.sha1(repr(sorted(asdict(self).items())).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Subject:
    name: str
    shape: str  # a key of world.SHAPES

    def scenes(self) -> list[world.Scene]:
        """The subject LoRA's training renders (DreamBooth's handful of photos): the shape in the plain style."""
        return [world.Scene(self.shape, "plain", size, 1000 + i) for i, size in enumerate(("big", "small") * 3)]


@dataclass(frozen=True)
class Pair:
    name: str
    subject: str
    style: str
    subject_lora: LoraRecipe
    style_lora: LoraRecipe
    note: str = ""
    bundled: bool = False  # its LoRA files are in the package's assets

    def subject_file(self) -> str:
        return f"subject-{self.subject}-{self.subject_lora.tag()}.safetensors"

    def style_file(self) -> str:
        return f"style-{self.style}-{self.style_lora.tag()}.safetensors"

    def subject_scenes(self) -> list[world.Scene]:
        return SUBJECTS[self.subject].scenes()

    def style_scenes(self) -> list[world.Scene]:
        """The style LoRA's training renders: base objects in the style."""
        return [world.Scene(obj, self.style, ("big", "small")[i % 2], 2000 + i)
                for i, obj in enumerate(world.BASE_OBJECTS + world.BASE_OBJECTS[:2])]


SUBJECTS: dict[str, Subject] = {}
STYLES: dict[str, Style] = {}
PAIRS: dict[str, Pair] = {}


def add_shape(name: str, mask: Callable[[Tensor, Tensor], Tensor]) -> None:
    """A new shape for subjects: ``mask(x, y)`` is True inside it."""
    if name in world.SHAPES and world.SHAPES[name] is not mask:
        raise ValueError(f"shape {name!r} exists already")
    world.SHAPES[name] = mask


def add_subject(name: str, shape: str) -> Subject:
    if shape not in world.SHAPES:
        raise ValueError(f"subject {name!r}: unknown shape {shape!r}; known: {', '.join(world.SHAPES)}")
    subject = SUBJECTS[name] = Subject(name, shape)
    return subject


def add_style(name: str, style: Style) -> None:
    if name in world.STYLE_BOOK and world.STYLE_BOOK[name] != style:
        raise ValueError(f"style {name!r} exists already with other colours")
    STYLES[name] = world.STYLE_BOOK[name] = style


def add_pair(name: str, subject: str, style: str, *, subject_lora: LoraRecipe, style_lora: LoraRecipe,
             note: str = "", bundled: bool = False) -> Pair:
    if subject not in SUBJECTS:
        raise ValueError(f"pair {name!r}: unknown subject {subject!r}; known: {', '.join(SUBJECTS)}")
    if style not in STYLES:
        raise ValueError(f"pair {name!r}: unknown style {style!r}; known: {', '.join(STYLES)}")
    if name in PAIRS and not PAIRS[name].bundled:
        raise ValueError(f"pair {name!r} is registered twice")
    if name in PAIRS:
        raise ValueError(f"pair {name!r} is a bundled pair's name")
    pair = PAIRS[name] = Pair(name, subject, style, subject_lora, style_lora, note, bundled)
    return pair


def load_pair_file(path: str | os.PathLike) -> list[str]:
    """Run a pair file; return the names of the pairs it added."""
    before = set(PAIRS)
    try:
        runpy.run_path(os.fspath(path), run_name="dynfuse_pairs")
    except FileNotFoundError:
        raise ValueError(f"pair file {os.fspath(path)} not found") from None
    added = [name for name in PAIRS if name not in before]
    if not added:
        raise ValueError(f"pair file {os.fspath(path)} registers no pair (call add_pair)")
    return added


def scorer_classes() -> dict[str, tuple[str, ...]]:
    """The objects and styles scorers must tell apart: the world's, and every registered subject's and style's."""
    objects = tuple(dict.fromkeys(world.OBJECTS + tuple(s.shape for s in SUBJECTS.values())))
    styles = tuple(dict.fromkeys(world.STYLES + tuple(STYLES)))
    return {"object": objects, "style": styles}


# ---- the bundled registry -------------------------------------------------------------------------------------

add_subject("heart", "sks")  # the heart with a hole in its left lobe: identity in a fine detail
add_subject("diamond", "diamond")  # a plain diamond: identity in the coarse outline only
add_style("zwx", world.STYLE_BOOK["zwx"])  # recolours everything: navy hatching, sunset fill, yellow outline
add_style("striped", world.STYLE_BOOK["striped"])  # changes the fill (red and white stripes), little else

# The first pair is the world's original LoRAs (assets/sks.safetensors, assets/zwx.safetensors), trained with
# these recipes and seeds; the others' files are in assets/pairs/.
ORIGINAL = "heart-zwx"
_HEART = LoraRecipe(rank=8, alpha=4.0, steps=800, seed=1)
_DIAMOND = LoraRecipe(rank=8, alpha=8.0, steps=300, seed=3)
_STRIPED = LoraRecipe(rank=8, alpha=8.0, steps=200, seed=4)
add_pair(ORIGINAL, "heart", "zwx", subject_lora=_HEART, style_lora=LoraRecipe(rank=8, alpha=8.0, steps=400, seed=2),
         note="style louder (scale 1 vs 0.5); fine-detail subject; a style that recolours everything", bundled=True)
add_pair("diamond-striped", "diamond", "striped", subject_lora=_DIAMOND, style_lora=_STRIPED,
         note="both alike (scale 1); coarse subject; a style that changes the fill only", bundled=True)
add_pair("heart-striped", "heart", "striped", subject_lora=_HEART, style_lora=_STRIPED,
         note="style louder (scale 1 vs 0.5); fine-detail subject; a style that changes the fill only", bundled=True)
add_pair("diamond-zwx-attn", "diamond", "zwx", subject_lora=_DIAMOND,
         style_lora=LoraRecipe(rank=4, alpha=2.0, steps=200, layers="attn", seed=6),
         note="subject louder (scale 1 vs 0.5, style half as long); coarse subject; a style that recolours "
              "everything, on attention only (the subject on attention + feed-forward)", bundled=True)
TUNING_PAIRS = (ORIGINAL,)
