"""The per-layer fusion: base output in, base + the chosen LoRA contribution out.

The hot path of a deciding layer is a fixed, small number of tensor operations whatever the batch, the number of
deciding rows or the rule: both candidate outputs (base + each delta) from one batched product, both divergences
of the deciding rows from one batched measure, the decision as one device tensor, and one select (or blend) of
the candidates. Nothing in it waits for the device.

A layer made of parts (a fused q, k, v projection: lib_dynfuse.engine.parts) decides each part on its own channels, with
the same operations: its candidates come from batched products over the parts, its divergences from one grouped
measure per run of equal parts, and its output is each channel's part's choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lib_dynfuse.engine.decisions import DecisionLog
from lib_dynfuse.engine.deltas import Delta, LayerGeometry
from lib_dynfuse.engine.divergence import divergence_sums, memory_budget
from lib_dynfuse.engine.measure import MeasureOptions
from lib_dynfuse.engine.layout import BatchLayout, StepClock
from lib_dynfuse.engine.pair import PairKernel, pair_kernel
from lib_dynfuse.engine.parts import Part, SlicedKernel, Terms, check_parts, runs
from lib_dynfuse.engine.policies import EngineOptions, LayerPair, Policy


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

    @property
    def one_row_per_unit(self) -> bool:
        """Every row is its own unit, in order: the units' decisions are the rows' decisions."""
        return self.unit_of_row == tuple(range(len(self.unit_of_row)))


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
    _tensors: dict[tuple, Tensor] = field(default_factory=dict)
    _budgets: dict[torch.device, tuple[StepClock, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.measure: MeasureOptions = self.options.measure_options()

    def plan(self, rows: int, start: int = 0) -> DecisionPlan:
        """The plan of a UNet call of ``rows`` rows that are the layout's rows from ``start`` on."""
        key = (start, rows)
        plan = self._plans.get(key)
        if plan is None:
            layout = self.layout
            if layout is None or start + rows > len(layout) or self.options.decide_per == "row":
                plan = DecisionPlan.per_row(rows, start)
                if layout is not None and start + rows <= len(layout):
                    self.log.units_are_rows_of(dict(zip(plan.units, layout.image_of_row[start:start + rows])))
            else:
                chunk = slice(start, start + rows)
                plan = DecisionPlan.tied_to_images(BatchLayout.rows(layout.image_of_row[chunk],
                                                                    layout.is_cond[chunk]))
            self._plans[key] = plan
        return plan

    def index(self, values: tuple[int, ...], device: torch.device, trailing: tuple[int, ...] = ()) -> Tensor:
        """``values`` as a long tensor on ``device`` (with ``trailing`` axes of size 1: what it indexes comes out
        shaped to broadcast), made once per layout (the hooks must not copy per call)."""
        key = (values, device, trailing)
        t = self._tensors.get(key)
        if t is None:
            t = self._tensors[key] = torch.tensor(values, dtype=torch.long, device=device).view(-1, *trailing)
        return t

    def budget(self, device: torch.device) -> int:
        """The divergence's memory budget in bytes on ``device``, read once per step (on CUDA from the allocator)."""
        read = self._budgets.get(device)
        if read is None or read[0] != self.clock:
            read = self._budgets[device] = (self.clock, memory_budget(device, self.options.divergence_budget_mb))
        return read[1]

    def set_layout(self, layout: BatchLayout | None) -> None:
        self.epoch += 1
        if layout != self.layout:
            self.layout = layout
            self._plans.clear()
            self._tensors.clear()


@dataclass(frozen=True)
class _Decided:
    """The decisions one call made: ``decision[i]`` for ``units[i]``, from divergences summed over ``tokens``."""

    units: tuple[int, ...]
    step: int
    decision: Tensor
    sums: Tensor
    tokens: int


class LayerFusion:
    """One hooked layer: its two deltas (either may be absent) and the decisions it made."""

    def __init__(self, name: str, module: nn.Module, subject: Delta | None, style: Delta | None) -> None:
        if subject is None and style is None:
            raise ValueError(f"layer {name} has neither a subject nor a style delta")
        self.subject = subject
        self.style = style
        self._setup(name, module)

    def _setup(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.names = (name,)  # the layers of the log this one decides for
        self.module = module
        self.geometry = LayerGeometry.of(module)
        self.channel_dim = -1 if self.geometry.kind == "linear" else 1
        self._kernels: dict[tuple, PairKernel | SlicedKernel] = {}
        self._made: dict[int, tuple[_Decided, int]] = {}  # unit -> the call that last decided it, its position
        self._last: _Decided | None = None
        self._logged: tuple[int, set[int]] = (-1, set())  # the step and the units already in the log for it
        self._next_row = (-1, 0)  # (layout epoch, where this layer's next call starts in the layout's rows)

    @property
    def contested(self) -> bool:
        return self.subject is not None and self.style is not None

    def pairs(self) -> dict[str, LayerPair]:
        """What the policies prepare for: each contested layer (or part) by the name it has in the log."""
        return {self.name: LayerPair(self.subject, self.style, self.geometry)} if self.contested else {}

    def _cached(self, key: tuple, make: Callable[[], PairKernel | SlicedKernel]) -> PairKernel | SlicedKernel:
        # Factors are prepared once per key (device and dtype at least), not per call (Forge may compute on another
        # device than the one its weights are stored on).
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._kernels[key] = make()
        return kernel

    def kernel(self, x: Tensor) -> PairKernel:
        return self._cached((x.device, x.dtype),
                            lambda: pair_kernel(self.subject, self.style, self.geometry, x.device, x.dtype))

    def weighted(self, x: Tensor, base: Tensor, weights: tuple[tuple[float, float], ...],
                 lone: tuple[float, float] = (1.0, 1.0)) -> Tensor:
        """The output with the deltas at ``weights``: one (subject, style) pair per layer of ``names``; a layer
        only one LoRA touches (no names) at ``lone``."""
        return self.kernel(x).weighted(x, base, *(weights[0] if self.contested else lone))

    def static_output(self, x: Tensor, base: Tensor) -> Tensor:
        """What the host's merge would give: base plus both deltas at their strengths."""
        return self.weighted(x, base, ((1.0, 1.0),) * len(self.names))

    def fuse(self, x: Tensor, base: Tensor, state: StepState) -> Tensor:
        if not self.contested:
            return self.weighted(x, base, (), state.policy.lone)
        plan = state.plan(base.shape[0], self._start_row(base.shape[0], state))
        if not state.policy.needs_divergence:
            return self._fixed(x, base, plan, state)
        candidates = self._candidates(x, base)
        decision = self._decision(base, candidates, plan, state)
        return self._apply(base, candidates, decision, plan, state)

    def _fixed(self, x: Tensor, base: Tensor, plan: DecisionPlan, state: StepState) -> Tensor:
        """A rule that does not read the outputs: the same weights for every unit, logged once per step."""
        step, progress = state.clock.index, state.clock.progress
        weights = tuple(state.policy.fixed(name, progress, step) for name in self.names)
        fresh = self._unlogged(plan.units, step)
        if fresh:
            for name, (w_subject, _) in zip(self.names, weights):
                state.log.record(name, step, fresh, w_subject)
        return self.weighted(x, base, weights, state.policy.lone)

    def _candidates(self, x: Tensor, base: Tensor) -> Tensor:
        return self.kernel(x).candidates(x, base)

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

    def _unlogged(self, units: tuple[int, ...], step: int) -> tuple[int, ...]:
        """The units not yet in the log for this step (a step's rows may come in several calls), now marked."""
        logged_step, logged = self._logged
        if logged_step != step:
            logged = set()
            self._logged = (step, logged)
        fresh = tuple(u for u in units if u not in logged)
        logged.update(fresh)
        return fresh

    def _decision(self, base: Tensor, candidates: Tensor, plan: DecisionPlan, state: StepState) -> Tensor:
        """One decision per unit of the plan: made now from the deciding rows, or kept from an earlier call of this
        step (the first call that sees an image decides for all its rows in that step: A1111 runs cond and uncond
        rows in one call unless it splits them, cond chunks first; Forge may run an uncond chunk first), or from
        an earlier step when deciding every n steps."""
        step, every = state.clock.index, state.options.decide_every
        kept = {u: made for u in plan.units if (made := self._made.get(u)) is not None and step - made[0].step < every}
        if not kept:
            return self._decide(base, candidates, plan.deciding_rows, plan.units, state).decision
        last = self._last
        if len(kept) == len(plan.units) and last is not None and last.units == plan.units:
            # The common case: the units of the last decision, in the same order.
            if self._unlogged(plan.units, step) == plan.units:
                self._log(last, step, state)
            return last.decision
        fresh = tuple(u for u in plan.units if u not in kept)
        if fresh:
            rows = tuple(r for u, r in zip(plan.units, plan.deciding_rows) if u not in kept)
            self._decide(base, candidates, rows, fresh, state)
        again = self._unlogged(tuple(u for u in plan.units if u in kept), step)
        if again:
            # Decisions kept from an earlier step are this step's decisions too (the map shows every step).
            self._log_kept(again, torch.stack([self._value(u) for u in again]), step, state)
        return torch.stack([self._value(u) for u in plan.units])

    def _log_kept(self, units: tuple[int, ...], values: Tensor, step: int, state: StepState) -> None:
        state.log.record(self.name, step, units, state.policy.subject_weight(values), winners=state.policy.one_hot)

    def _value(self, unit: int) -> Tensor:
        decided, position = self._made[unit]
        return decided.decision[position]

    def _decide(self, base: Tensor, candidates: Tensor, rows: tuple[int, ...], units: tuple[int, ...],
                state: StepState) -> _Decided:
        # A decision is never differentiated (the divergence works in place), whoever runs the model with gradients.
        with torch.no_grad():
            sums, tokens = self._measure(*_rows(base, candidates, rows, state), state, budget=state.budget(base.device))
            decided = _Decided(units, state.clock.index, state.policy.decide(sums, tokens), sums, tokens)
        for position, unit in enumerate(units):
            self._made[unit] = (decided, position)
        self._last = decided
        self._unlogged(units, decided.step)
        self._log(decided, decided.step, state)
        return decided

    def _measure(self, base: Tensor, candidates: Tensor, state: StepState, budget: int) -> tuple[Tensor, int]:
        """Both candidates' divergences of the deciding rows, summed over the tokens ``[2, rows]``, and the count."""
        return divergence_sums(base, candidates, channel_dim=self.channel_dim, options=state.measure,
                               budget_bytes=budget)

    def _log(self, decided: _Decided, step: int, state: StepState) -> None:
        state.log.record(self.name, step, decided.units, state.policy.subject_weight(decided.decision), decided.sums,
                         decided.tokens, winners=state.policy.one_hot)

    def _apply(self, base: Tensor, candidates: Tensor, decision: Tensor, plan: DecisionPlan,
               state: StepState) -> Tensor:
        """Each row's candidate: the winner's (hard rules), the blend by the subject's weight (soft rules), or the
        base plus each delta at its own weight (two-weight rules)."""
        device = candidates.device
        if state.policy.one_hot or state.policy.two_weights:
            per_row = decision if plan.one_row_per_unit else decision[state.index(plan.unit_of_row, device)]
            if state.policy.one_hot:
                return candidates[per_row, state.index(tuple(range(len(plan.unit_of_row))), device)]
            weights = per_row.to(candidates.dtype).T.reshape((2, -1) + (1,) * (candidates.dim() - 2))
            return _two_weighted(base, candidates, weights)
        broadcast = (1,) * (candidates.dim() - 2)
        weight = decision.to(candidates.dtype)
        weight = (weight.view(-1, *broadcast) if plan.one_row_per_unit
                  else weight[state.index(plan.unit_of_row, device, broadcast)])
        subject, style = candidates.unbind(0)
        return torch.lerp(style, subject, weight)


class SlicedLayerFusion(LayerFusion):
    """One hooked layer made of parts (lib_dynfuse.engine.parts), each a layer of the log: a decision per unit and part."""

    def __init__(self, name: str, module: nn.Module, parts: list[Part]) -> None:
        self._setup(name, module)
        self.parts = sorted(parts, key=lambda part: part.start)
        check_parts(name, self.parts, self.geometry)
        self.subject = self.style = None
        self.rivals = tuple(part for part in self.parts if part.contested)
        self.names = tuple(part.name for part in self.rivals)
        self._runs = runs(self.rivals)
        # Each output channel's column in a decision (channels of no contested part are equal in both candidates:
        # any column does for them), on each device it is used on.
        columns = torch.zeros(self.geometry.out_channels, dtype=torch.long)
        contested = torch.zeros(self.geometry.out_channels, dtype=torch.bool)
        for column, part in enumerate(self.rivals):
            columns[part.start:part.stop] = column
            contested[part.start:part.stop] = True
        self._columns = {columns.device: columns}
        self._contested = {contested.device: contested}  # for the two-weight rules, whose weights do not sum to 1

    @property
    def contested(self) -> bool:
        return bool(self.rivals)

    def pairs(self) -> dict[str, LayerPair]:
        return {part.name: LayerPair(part.subject, part.style, part.geometry(self.geometry)) for part in self.rivals}

    def _sliced(self, x: Tensor, key: tuple, slots: Callable[[], list[list[Terms]]]) -> SlicedKernel:
        """The kernel of the ``slots`` (made, and ``slots`` built, once per device, dtype and ``key``)."""
        return self._cached((x.device, x.dtype, *key),
                            lambda: SlicedKernel(self.parts, slots(), self.geometry, x.device, x.dtype))

    def _candidates(self, x: Tensor, base: Tensor) -> Tensor:
        # A part only one LoRA touches gets its delta in both candidates: whichever wins the part's channels
        # (they decide nothing), it is added.
        def slots() -> list[list[Terms]]:
            return [[[(part.subject if part.contested else part.only, 1.0)] for part in self.parts],
                    [[(part.style if part.contested else part.only, 1.0)] for part in self.parts]]
        return self._sliced(x, ("candidates",), slots).outputs(x, base)

    def weighted(self, x: Tensor, base: Tensor, weights: tuple[tuple[float, float], ...],
                 lone: tuple[float, float] = (1.0, 1.0)) -> Tensor:
        """The output with each contested part's deltas at its (subject, style) weights and every other part's
        delta at its LoRA's weight in ``lone``."""
        def slots() -> list[list[Terms]]:
            rival = iter(weights)
            return [[[(d, w) for d, w in zip((part.subject, part.style), next(rival) if part.contested else lone)
                      if d is not None] for part in self.parts]]
        return self._sliced(x, ("weighted", weights, lone), slots).outputs(x, base)[0]

    def _measure(self, base: Tensor, candidates: Tensor, state: StepState, budget: int) -> tuple[Tensor, int]:
        """``[2, rows, parts]``: each run of equal parts measured as that many groups of channels."""
        sums = []
        channels = base.shape[-1]
        for run in self._runs:
            b, c = base, candidates
            if run.channels != channels:
                b, c = base.narrow(-1, run.start, run.channels), candidates.narrow(-1, run.start, run.channels)
            run_sums, tokens = divergence_sums(b, c, channel_dim=-1, options=state.measure, budget_bytes=budget,
                                               groups=run.count)
            sums.append(run_sums)
        return (sums[0] if len(sums) == 1 else torch.cat(sums, dim=2)), tokens

    def _log(self, decided: _Decided, step: int, state: StepState) -> None:
        state.log.record_parts(self.names, step, decided.units, state.policy.subject_weight(decided.decision),
                               decided.sums, decided.tokens, winners=state.policy.one_hot)

    def _log_kept(self, units: tuple[int, ...], values: Tensor, step: int, state: StepState) -> None:
        state.log.record_parts(self.names, step, units, state.policy.subject_weight(values),
                               winners=state.policy.one_hot)

    def _apply(self, base: Tensor, candidates: Tensor, decision: Tensor, plan: DecisionPlan,
               state: StepState) -> Tensor:
        """Each row's channels from the candidate its part chose, or blended by the part's subject weight."""
        device = candidates.device
        per_row = decision if plan.one_row_per_unit else decision.index_select(0, state.index(plan.unit_of_row, device))
        columns = self._columns.get(device)
        if columns is None:
            columns = self._columns[device] = next(iter(self._columns.values())).to(device)
        per_channel = per_row.index_select(1, columns)
        shape = (per_channel.shape[0],) + (1,) * (candidates.dim() - 3) + (per_channel.shape[1],)
        if state.policy.one_hot:
            return candidates.gather(0, per_channel.view(1, *shape).expand(1, *candidates.shape[1:]))[0]
        if state.policy.two_weights:  # per_channel [rows, channels, 2]
            # A channel of no contested part has the same candidate twice: it takes the subject one at weight 1.
            contested = self._contested.get(device)
            if contested is None:
                contested = self._contested[device] = next(iter(self._contested.values())).to(device)
            weights = torch.where(contested.view(-1, 1), per_channel.to(candidates.dtype),
                                  torch.tensor([1.0, 0.0], dtype=candidates.dtype, device=device))
            return _two_weighted(base, candidates, weights.movedim(-1, 0).reshape((2,) + shape))
        return torch.lerp(candidates[1], candidates[0], per_channel.to(candidates.dtype).view(shape))


def _two_weighted(base: Tensor, candidates: Tensor, weights: Tensor) -> Tensor:
    """base + w_subject · (subject candidate − base) + w_style · (style candidate − base)."""
    return torch.addcmul(base, weights, candidates - base).sum(0) - base


def _rows(base: Tensor, candidates: Tensor, rows: tuple[int, ...], state: StepState) -> tuple[Tensor, Tensor]:
    """The deciding rows of the base output and of the candidates: views when the rows are consecutive."""
    if len(rows) == base.shape[0] and rows == tuple(range(len(rows))):
        return base, candidates
    first = rows[0]
    if rows == tuple(range(first, first + len(rows))):
        return base.narrow(0, first, len(rows)), candidates.narrow(1, first, len(rows))
    index = state.index(rows, base.device)
    return base.index_select(0, index), candidates.index_select(1, index)
