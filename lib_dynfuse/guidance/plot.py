"""The guidance loss curve as a small PIL image (no plotting library needed)."""
from __future__ import annotations

from PIL import Image, ImageDraw


def loss_curve(points: list[tuple[int, float]], size: tuple[int, int] = (512, 256)) -> Image.Image:
    """Loss (y) against sampling step (x); the y range is labelled with its min and max."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 48, 16, width - 12, height - 28
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    draw.text((left, bottom + 8), "DynFuse guidance loss per step", fill="black")
    if not points:
        draw.text((left + 8, top + 8), "no guided steps", fill="black")
        return image
    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    lo, hi = min(losses), max(losses)
    s0, s1 = min(steps), max(steps)

    def xy(step: int, loss: float) -> tuple[float, float]:
        x = left + (step - s0) / max(s1 - s0, 1) * (right - left)
        y = bottom - (loss - lo) / ((hi - lo) or 1.0) * (bottom - top)
        return x, y

    coords = [xy(s, v) for s, v in points]
    if len(coords) > 1:
        draw.line(coords, fill=(200, 60, 40), width=2)
    for x, y in coords:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(200, 60, 40))
    draw.text((2, top), f"{hi:.3f}", fill="black")
    draw.text((2, bottom - 10), f"{lo:.3f}", fill="black")
    return image


__all__ = ["loss_curve"]
