"""What the user sees of the decisions: the selection map image and a one-line summary for the infotext."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

from lib_dynfuse.engine.decisions import DecisionLog

SUBJECT_RGB = (235, 125, 40)
STYLE_RGB = (45, 110, 215)
EMPTY_RGB = (60, 60, 60)
_LEGEND_HEIGHT = 18


def cell_colour(subject_weight: float) -> tuple[int, int, int]:
    if math.isnan(subject_weight):
        return EMPTY_RGB
    return tuple(round(s * subject_weight + t * (1.0 - subject_weight)) for s, t in zip(SUBJECT_RGB, STYLE_RGB))


def selection_map(logs: DecisionLog | Sequence[DecisionLog], layer_names: list[str] | None = None, *,
                  title: str = "", image: int | None = None, width: int = 640, min_height: int = 240) -> Image.Image:
    """Layers (rows, in hook order) × steps (columns) of one image of the batch (or of all: blends = share of the
    batch); orange = subject, blue = style, blends = soft weights. Several sampling runs of the same images (a
    first pass, then hires) are drawn one after the other with a dark line between them. A legend line on top
    names the colours."""
    runs = [logs] if isinstance(logs, DecisionLog) else list(logs)
    log = DecisionLog.joined(runs)
    layers, steps, grid = log.matrix(layer_names, image)
    n_layers, n_steps = max(len(layers), 1), max(len(steps), 1)
    cell_w = max(1, width // n_steps)
    cell_h = max(1, math.ceil(min_height / n_layers))
    image = Image.new("RGB", (cell_w * n_steps, cell_h * n_layers + _LEGEND_HEIGHT), (20, 20, 20))
    pixels = Image.new("RGB", (n_steps, n_layers), EMPTY_RGB)
    pixels.putdata([cell_colour(float(v)) for v in grid.flatten().tolist()] or [EMPTY_RGB])
    image.paste(pixels.resize((cell_w * n_steps, cell_h * n_layers), Image.NEAREST), (0, _LEGEND_HEIGHT))
    draw = ImageDraw.Draw(image)
    run_steps = [len(run.steps) for run in runs if run.steps]
    if cell_w > 2:  # narrower cells would lose a column to the line
        for column in itertools.accumulate(run_steps[:-1]):
            draw.line([(column * cell_w, _LEGEND_HEIGHT), (column * cell_w, image.height)], fill=(20, 20, 20))
    draw.rectangle((4, 4, 14, 14), fill=SUBJECT_RGB)
    draw.text((18, 3), "subject", fill=(230, 230, 230))
    draw.rectangle((80, 4, 90, 14), fill=STYLE_RGB)
    draw.text((94, 3), "style", fill=(230, 230, 230))
    step_text = " + ".join(map(str, run_steps)) if len(run_steps) > 1 else str(len(steps))
    summary = selection_summary(log, image)
    draw.text((150, 3), f"{title}{len(layers)} layers x {step_text} steps   {summary}", fill=(230, 230, 230))
    return image


def selection_summary(logs: DecisionLog | Sequence[DecisionLog], image: int | None = None) -> str:
    """``subject 0.42``: the share of layer-step decisions won by the subject (over every given sampling run), for
    one image of the batch or for all; empty when nothing was decided."""
    share = (logs if isinstance(logs, DecisionLog) else DecisionLog.joined(logs)).subject_share(image)
    return "" if share is None else f"subject {share:.2f}"
