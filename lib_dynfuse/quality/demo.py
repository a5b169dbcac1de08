"""``python -m lib_dynfuse demo``: one prompt in the bundled world, on one of its LoRA pairs: the best static merge
(of the 25 of the comparison's sweep, on the demo's seeds), the default method and ``kl`` (the paper's rule), with
the selection map and the scores, saved as one PNG. No WebUI, no download; under a minute on a CPU."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw

from lib_dynfuse.guidance import GuidanceParams
from lib_dynfuse.engine.policies import EngineOptions
from lib_dynfuse.quality import pairs, world
from lib_dynfuse.quality.compare import STATIC_WEIGHTS, add_balance_to_scores
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


def run(out: str, *, prompt: str = DEMO_PROMPT, seeds: Sequence[int] = (0, 1, 2, 3), method: str | None = None,
        guidance: bool = False, pair: str = pairs.ORIGINAL, assets: str | os.PathLike = ASSETS,
        cache: str | os.PathLike = "out/quality-pairs", log=print) -> dict[str, dict[str, float]]:
    """Generate, score and save the demo picture to ``out``; return the mean scores of every row. ``method``: a
    further method shown beside the default and ``kl``."""
    from lib_dynfuse.quality.bench import pair_world
    from lib_dynfuse.quality.train import Recipe

    if pair not in pairs.PAIRS:
        raise ValueError(f"unknown pair {pair!r}; registered: {', '.join(pairs.PAIRS)}")
    model = pair_world(World.load(assets), pairs.PAIRS[pair], os.fspath(assets), os.fspath(cache), Recipe(), log)
    judge = model.judge()
    prompts = [prompt] * len(seeds)

    def make(options: EngineOptions, s: float = 1.0, t: float = 1.0, guide: bool = False):
        session = model.fusion(options, s, t)
        images = model.generate(prompts, seeds, session=session,
                                guidance=model.guidance(GuidanceParams(), log=log) if guide else None)
        return images, judge.scores(images, prompts), session

    anchors = [make(EngineOptions(method=m))[1] for m in ("subject-only", "style-only")]
    merges = {(s, t): make(EngineOptions(method="static"), s, t) for s in STATIC_WEIGHTS for t in STATIC_WEIGHTS}
    for _, scores, _ in merges.values():
        add_balance_to_scores(scores, *anchors)
    (s, t), best = max(merges.items(), key=lambda item: float(item[1][1]["balance"].mean()))
    default = EngineOptions().method
    methods = list(dict.fromkeys([default, "kl"] + ([method] if method else [])))
    suffix = " + guidance" if guidance else ""
    rows = {f"best static merge {s:g}/{t:g} (of 25)": best}
    for m in methods:
        label = f"DynFuse {m}" + (" (default)" if m == default else "") + (" (the paper's rule)" if m == "kl" else "")
        rows[label + suffix] = make(EngineOptions(method=m), guide=guidance)
        add_balance_to_scores(rows[label + suffix][1], *anchors)
    chart_method, chart_session = methods[-1] if method else default, None
    for label, (_, _, session) in rows.items():
        if label.startswith(f"DynFuse {chart_method}"):
            chart_session = session
    subject_refs, style_refs = model.references()
    refs = _tiles(torch.cat([subject_refs[:2], style_refs[:2]]))
    strips = {name: _tiles(images) for name, (images, _, _) in rows.items()}
    chart = selection_map(chart_session.log, title=f"{chart_method}: ", width=refs.width)
    line = 16
    height = (line + refs.height) + sum(2 * line + s.height for s in strips.values()) + line + chart.height + 8
    canvas = Image.new("RGB", (max(refs.width, chart.width) + 16, height + 8), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 8
    draw.text((8, y), f'"{prompt}"   pair {pair}   references: subject x2, style x2', fill=_TEXT)
    canvas.paste(refs, (8, y + line))
    y += line + refs.height + 8
    for name, strip in strips.items():
        draw.text((8, y), f"{name}   seeds {', '.join(map(str, seeds))}", fill=_TEXT)
        canvas.paste(strip, (8, y + line))
        draw.text((8, y + line + strip.height + 1), _score_line(rows[name][1]), fill=_TEXT)
        y += 2 * line + strip.height + 4
    draw.text((8, y), f"{chart_method}: the subject's weight in each layer at each step (layers top to bottom, "
                      "steps left to right)", fill=_TEXT)
    canvas.paste(chart, (8, y + line))
    canvas.save(out)
    summary = {name: {k: round(float(v.mean()), 4) for k, v in scores.items()} for name, (_, scores, _) in rows.items()}
    for name, scores in summary.items():
        log(f"{name:<44} " + "   ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    log(f"saved {out}")
    return summary
