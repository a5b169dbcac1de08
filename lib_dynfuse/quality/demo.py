"""``python -m lib_dynfuse demo``: one prompt in the bundled world, the static merge next to DynFuse, with the
selection map and the scores, saved as one PNG. No WebUI, no download; a few seconds on a CPU."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw

from lib_dynfuse.guidance import GuidanceParams
from lib_dynfuse.engine.policies import EngineOptions
from lib_dynfuse.quality import world
from lib_dynfuse.quality.model import ASSETS, World
from lib_dynfuse.report import selection_map

DEMO_PROMPT = "a sks, zwx style"
SCALE = 4
_TEXT = (20, 20, 20)


def _tiles(images: torch.Tensor) -> Image.Image:
    cell = world.SIZE * SCALE
    strip = Image.new("RGB", (cell * images.shape[0] + 4 * (images.shape[0] - 1), cell), (255, 255, 255))
    for i, image in enumerate(images):
        strip.paste(world.to_pil(image).resize((cell, cell), Image.NEAREST), (i * (cell + 4), 0))
    return strip


def _score_line(scores: dict[str, torch.Tensor]) -> str:
    return "   ".join(f"{k} {float(v.mean()):.2f}" for k, v in scores.items())


def run(out: str, *, prompt: str = DEMO_PROMPT, seeds: Sequence[int] = (0, 1, 2, 3), method: str = "kl",
        guidance: bool = False, assets: str | os.PathLike = ASSETS, log=print) -> dict[str, dict[str, float]]:
    """Generate, score and save the demo picture to ``out``; return the mean scores of both rows."""
    model = World.load(assets)
    judge = model.judge()
    prompts = [prompt] * len(seeds)
    static = model.generate(prompts, seeds, session=model.fusion(EngineOptions(method="static")))
    session = model.fusion(EngineOptions(method=method))
    guide = model.guidance(GuidanceParams(), log=log) if guidance else None
    dynamic = model.generate(prompts, seeds, session=session, guidance=guide)
    rows = {"static merge": (static, judge.scores(static, prompts)),
            f"DynFuse {method}" + (" + guidance" if guidance else ""): (dynamic, judge.scores(dynamic, prompts))}
    subject_refs, style_refs = model.references()
    refs = _tiles(torch.cat([subject_refs[:2], style_refs[:2]]))
    strips = {name: _tiles(images) for name, (images, _) in rows.items()}
    chart = selection_map(session.log, title=f"{method}: ", width=refs.width)
    line = 16
    height = (line + refs.height) + sum(2 * line + s.height for s in strips.values()) + line + chart.height + 8
    canvas = Image.new("RGB", (max(refs.width, chart.width) + 16, height + 8), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 8
    draw.text((8, y), f'"{prompt}"   references: subject (sks LoRA) x2, style (zwx LoRA) x2', fill=_TEXT)
    canvas.paste(refs, (8, y + line))
    y += line + refs.height + 8
    for name, strip in strips.items():
        draw.text((8, y), f"{name}   seeds {', '.join(map(str, seeds))}", fill=_TEXT)
        canvas.paste(strip, (8, y + line))
        draw.text((8, y + line + strip.height + 1), _score_line(rows[name][1]), fill=_TEXT)
        y += 2 * line + strip.height + 4
    draw.text((8, y), "which LoRA each layer used at each step (layers top to bottom, steps left to right)", fill=_TEXT)
    canvas.paste(chart, (8, y + line))
    canvas.save(out)
    summary = {name: {k: round(float(v.mean()), 4) for k, v in scores.items()} for name, (_, scores) in rows.items()}
    for name, scores in summary.items():
        log(f"{name:<24} " + "   ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    log(f"saved {out}")
    return summary
