"""The per-layer fusion: base output in, base + the chosen LoRA contribution out."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lib_dynfuse.decisions import DecisionLog
from lib_dynfuse.deltas import Delta, LayerGeometry
from lib_dynfuse.divergence import row_divergence
from lib_dynfuse.layout import BatchLayout, StepClock
from lib_dynfuse.policies import EngineOptions, Policy


@dataclass(frozen=True)
class DecisionPlan:
    """Which row of one UNet call decides for which unit (an image, or a row), and which unit each row follows."""

    deciding_rows: tuple[int, ...]  # one per unit
    units: tuple[int, ...]
    unit_of_row: tuple[int, ...]  # index into units
    tied: bool = False  # units are images whose rows share one decision

    @classmethod
    def per_row(cls, rows: int, first: int = 0) -> DecisionPlan:
        """Every row decides for itself; its unit is its place in the step's rows, so that the chunks of one step
        do not share unit numbers."""
        r = tuple(range(rows))
        return cls(r, tuple(range(first, first + rows)), r)

    @classmethod
    def tied_to_images(cls, layout: BatchLayout) -> DecisionPlan:
        images = layout.images
        index = {image: i for i, image in enumerate(images)}
        return cls(tuple(layout.deciding_row[i] for i in images), images,
                   tuple(index[image] for image in layout.image_of_row), tied=True)


@dataclass
class StepState:
    """What every hook of the session reads for the current UNet call."""

    policy: Policy
    options: EngineOptions
    log: DecisionLog
    clock: StepClock = field(default_factory=lambda: StepClock(0, 1))
    layout: BatchLayout | None = None
    epoch: int = 0  # counts set_layout calls: the UNet calls after one cover its layout's rows in order
    _plans: dict[tuple[int, int], DecisionPlan] = field(default_factory=dict)
    _indices: dict[tuple[int, torch.device], Tensor] = field(default_factory=dict)

    def plan(self, rows: int, start: int = 0) -> DecisionPlan:
        """The plan of a UNet call of ``rows`` rows that are the layout's rows from ``start`` on."""
        key = (start, rows)
        plan = self._plans.get(key)
        if plan is None:
            layout = self.layout
            if layout is None or start + rows > len(layout) or self.options.decide_per == "row":
                plan = DecisionPlan.per_row(rows, start)
            else:
                chunk = slice(start, start + rows)
                plan = DecisionPlan.tied_to_images(BatchLayout.rows(layout.image_of_row[chunk],
                                                                    layout.is_cond[chunk]))
            self._plans[key] = plan
        return plan

    def row_index(self, plan: DecisionPlan, device: torch.device) -> Tensor:
        key = (id(plan), device)
        index = self._indices.get(key)
        if index is None:
            index = self._indices[key] = torch.tensor(plan.unit_of_row, device=device)
        return index

    def set_layout(self, layout: BatchLayout | None) -> None:
        self.epoch += 1
        if layout != self.layout:
            self.layout = layout
            self._plans.clear()
            self._indices.clear()


class LayerFusion:
    """One hooked layer: its two deltas (either may be absent) and the decisions it made this step."""

    def __init__(self, name: str, module: nn.Module, subject: Delta | None, style: Delta | None) -> None:
        if subject is None and style is None:
            raise ValueError(f"layer {name} has neither a subject nor a style delta")
        self.name = name
        self.module = module
        self.subject = subject
        self.style = style
        self.geometry = LayerGeometry.of(module)
        self.channel_dim = -1 if self.geometry.kind == "linear" else 1
        self._prepared: dict[tuple[torch.device, torch.dtype], tuple[Delta | None, Delta | None]] = {}
        self._tied: dict[int, tuple[int, Tensor, Tensor]] = {}
        self._next_row = (-1, 0)  # (layout epoch, where this layer's next call starts in the layout's rows)

    @property
    def contested(self) -> bool:
        return self.subject is not None and self.style is not None

    def deltas_for(self, x: Tensor) -> tuple[Delta | None, Delta | None]:
        # Factors are moved once per device/dtype, not per call (Forge may compute on another device than
        # the one its weights are stored on).
        key = (x.device, x.dtype)
        pair = self._prepared.get(key)
        if pair is None:
            pair = tuple(None if d is None else d.to(device=x.device, dtype=x.dtype) for d in (self.subject, self.style))
            self._prepared[key] = pair
        return pair

    def static_output(self, x: Tensor, base: Tensor) -> Tensor:
        """What the host's merge would give: base plus both deltas at their strengths."""
        out = base
        for delta in self.deltas_for(x):
            if delta is not None:
                out = out + delta.output(x, self.geometry)
        return out

    def fuse(self, x: Tensor, base: Tensor, state: StepState) -> Tensor:
        subject, style = self.deltas_for(x)
        if subject is None or style is None:
            return self.static_output(x, base)
        y_subject = subject.output(x, self.geometry)
        y_style = style.output(x, self.geometry)
        plan = state.plan(base.shape[0], self._start_row(base.shape[0], state))
        step = state.clock.index
        # The first call of a step that sees an image decides for all its rows in that step: A1111 runs cond and
        # uncond rows in one call unless it splits them (cond chunks first), Forge may run an uncond chunk first.
        reused = {}
        if plan.tied:
            reused = {u: hit for u in plan.units if (hit := self._tied.get(u)) is not None and hit[0] == step}
        if reused:
            fresh = tuple(u for u in plan.units if u not in reused)
            rows = tuple(r for u, r in zip(plan.units, plan.deciding_rows) if u not in reused)
            decided = self._decide(base, y_subject, y_style, rows, fresh, state) if fresh else None
            w_subject, w_style = (
                torch.stack([reused[u][k + 1] if u in reused else decided[k][fresh.index(u)] for u in plan.units])
                for k in (0, 1))
        else:
            w_subject, w_style = self._decide(base, y_subject, y_style, plan.deciding_rows, plan.units, state)
        if plan.tied:
            for i, unit in enumerate(plan.units):
                if unit not in reused:
                    self._tied[unit] = (step, w_subject[i], w_style[i])
        index = state.row_index(plan, base.device)
        shape = (-1,) + (1,) * (base.dim() - 1)
        if state.policy.one_hot:
            # A select instead of two scaled copies; decided on the device, so no host sync per layer.
            return base + torch.where(w_subject[index].view(shape) > 0.5, y_subject, y_style)
        w_subject_rows = w_subject.to(base.dtype)[index].view(shape)
        w_style_rows = w_style.to(base.dtype)[index].view(shape)
        return base + y_subject.mul_(w_subject_rows).add_(y_style.mul_(w_style_rows))

    def _start_row(self, rows: int, state: StepState) -> int:
        """Where this call's rows start in the layout. A1111 splits one CFG step's rows over several UNet calls
        in the layout's order (without batch_cond_uncond, or when prompt and negative prompt differ in length),
        and every hooked layer runs once per UNet call, so each layer counts the rows it has seen since the
        layout was set. A call that would run past the layout's end (another extension's extra UNet call) is read
        from the first row on."""
        epoch, start = self._next_row
        if epoch != state.epoch or (state.layout is not None and start + rows > len(state.layout)):
            start = 0
        self._next_row = (state.epoch, start + rows)
        return start

    def _decide(self, base: Tensor, y_subject: Tensor, y_style: Tensor, rows: tuple[int, ...],
                units: tuple[int, ...], state: StepState) -> tuple[Tensor, Tensor]:
        d_subject = d_style = None
        if state.policy.needs_divergence:
            kwargs = dict(channel_dim=self.channel_dim, measure=state.options.measure,
                          temperature=state.options.temperature, standardize=state.options.standardize, rows=rows)
            d_subject = row_divergence(base, y_subject, **kwargs)
            d_style = row_divergence(base, y_style, **kwargs)
        w_subject, w_style = state.policy.weights(self.name, state.clock.progress, state.clock.index,
                                                  d_subject, d_style, len(units), base.device)
        state.log.record(self.name, state.clock.index, units, w_subject, d_subject, d_style)
        return w_subject, w_style
