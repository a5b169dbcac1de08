"""The guidance loss curve as a small PIL image (no plotting library needed)."""
from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

CURVE = (200, 60, 40)


def loss_curve(runs: Sequence[Sequence[tuple[int, float]]], size: tuple[int, int] = (512, 256)) -> Image.Image:
    """Loss (y) against sampling step (x), one line per sampling run (batch, hires pass) over a shared step
    axis; the y range is labelled with its min and max."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 48, 16, width - 12, height - 28
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    draw.text((left, bottom + 8), "DynFuse guidance loss per step", fill="black")
    points = [point for run in runs for point in run]
    if not points:
        draw.text((left + 8, top + 8), "no guided steps", fill="black")
        return image
    lo, hi = min(p[1] for p in points), max(p[1] for p in points)
    s0, s1 = min(p[0] for p in points), max(p[0] for p in points)

    def xy(step: int, loss: float) -> tuple[float, float]:
        x = left + (step - s0) / max(s1 - s0, 1) * (right - left)
        y = bottom - (loss - lo) / ((hi - lo) or 1.0) * (bottom - top)
        return x, y

    for run in runs:
        coords = [xy(s, v) for s, v in run]
        if len(coords) > 1:
            draw.line(coords, fill=CURVE, width=2)
        for x, y in coords:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=CURVE)
    draw.text((2, top), f"{hi:.3f}", fill="black")
    draw.text((2, bottom - 10), f"{lo:.3f}", fill="black")
    return image


__all__ = ["CURVE", "loss_curve"]
