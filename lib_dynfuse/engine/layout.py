"""Where the sampler is (the step clock) and what the rows of a UNet batch are (the batch layout)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class StepClock:
    """The sampler's own step, never a count of calls: hires passes, img2img and second-order samplers call
    the UNet a varying number of times per step."""

    index: int
    total: int
    sigma: float | None = None

    @property
    def progress(self) -> float:
        """Share of the schedule done before this step: 0 at pure noise."""
        return self.index / self.total if self.total > 0 else 0.0


@dataclass(frozen=True)
class BatchLayout:
    """For every row of a UNet batch: which image of the job it belongs to and whether it is a conditional row."""

    image_of_row: tuple[int, ...]
    is_cond: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.image_of_row) != len(self.is_cond):
            raise ValueError("image_of_row and is_cond must have one entry per row")

    @classmethod
    def a1111(cls, n_images: int, conds_per_image: int = 1, uncond: bool = True) -> BatchLayout:
        """A1111's CFGDenoiser batch: every image's cond rows (its AND-prompts, consecutive), then one uncond
        row per image."""
        images = [i for i in range(n_images) for _ in range(conds_per_image)]
        conds = [True] * len(images)
        if uncond:
            images += list(range(n_images))
            conds += [False] * n_images
        return cls(tuple(images), tuple(conds))

    @classmethod
    def rows(cls, image_of_row: list[int] | tuple[int, ...], is_cond: list[bool] | tuple[bool, ...]) -> BatchLayout:
        return cls(tuple(int(i) for i in image_of_row), tuple(bool(c) for c in is_cond))

    @classmethod
    def chunks(cls, cond_or_uncond: list[int] | tuple[int, ...], rows: int) -> BatchLayout | None:
        """A batch of equal chunks, one per entry of ``cond_or_uncond`` (0 = cond, 1 = uncond, in the host's
        order), row ``i`` of every chunk belonging to image ``i``: the batches of ComfyUI's sampler and of the
        Forge family's, which descends from it. None when the rows do not split so."""
        kinds = list(cond_or_uncond)
        if not kinds or rows % len(kinds):
            return None
        per_chunk = rows // len(kinds)
        return cls.rows([i for _ in kinds for i in range(per_chunk)],
                        [k == 0 for k in kinds for _ in range(per_chunk)])

    def __len__(self) -> int:
        return len(self.image_of_row)

    @cached_property
    def images(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.image_of_row)))

    @cached_property
    def deciding_row(self) -> dict[int, int]:
        """The row that decides for each image: its first conditional row, else its first row."""
        chosen: dict[int, int] = {}
        for row, (image, cond) in enumerate(zip(self.image_of_row, self.is_cond)):
            if image not in chosen or (cond and not self.is_cond[chosen[image]]):
                chosen[image] = row
        return chosen
