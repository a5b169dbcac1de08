"""Who wins a layer at a step: the rules that turn two LoRA contributions into one.

A rule gives, for each decision unit (an image, or a batch row), the weight of the subject delta and the weight of
the style delta. The hard rules give one LoRA weight 1 and the other 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from lib_dynfuse.engine.deltas import Delta, LayerGeometry
from lib_dynfuse.engine.measure import MEASURES, MeasureOptions
from lib_dynfuse.engine.layout import StepClock

METHODS = ("kl", "kl-even", "kl-soft", "k-lora", "switch", "static", "subject-only", "style-only")
DIVERGENCE_METHODS = ("kl", "kl-even", "kl-soft")
KLORA_SCHEDULES = ("S", "S*")


@dataclass
class EngineOptions:
    """Everything the fusion engine needs to know about the user's choice of rule."""

    method: str = "kl"
    measure: str = "kl"
    temperature: float = 1.0
    standardize: bool = False
    decide_per: str = "image"
    soft_temperature: float = 1.0
    even_power: float = -0.5
    switch_every: int = 5
    klora_alpha: float = 1.5
    klora_beta: float = 0.5
    klora_schedule: str = "S"
    # Cheaper decisions: decide at every n-th step and keep the decision in between; measure the divergence on a
    # fixed-stride subsample of at most this many tokens per row (0: all).
    decide_every: int = 1
    max_tokens: int = 0
    compiled: bool = False  # the divergence as compiled kernels (lib_dynfuse.engine.compiled); meant for CUDA
    # The divergence's memory budget in MB (0: lib_dynfuse.engine.divergence.memory_budget's default for the device)
    divergence_budget_mb: int = 0

    def validate(self) -> None:
        checks = {
            "method": self.method in METHODS,
            "measure": self.measure in MEASURES,
            "temperature": self.temperature > 0,
            "decide_per": self.decide_per in ("image", "row"),
            "soft_temperature": self.soft_temperature > 0,
            "switch_every": int(self.switch_every) == self.switch_every and self.switch_every >= 1,
            "klora_alpha": self.klora_alpha > 0,
            "klora_beta": self.klora_beta >= 0,
            "klora_schedule": self.klora_schedule in KLORA_SCHEDULES,
            "decide_every": int(self.decide_every) == self.decide_every and self.decide_every >= 1,
            "max_tokens": int(self.max_tokens) == self.max_tokens and self.max_tokens >= 0,
            "divergence_budget_mb": int(self.divergence_budget_mb) == self.divergence_budget_mb
            and self.divergence_budget_mb >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"invalid DynFuse engine options: {values}")

    def measure_options(self) -> MeasureOptions:
        return MeasureOptions(self.measure, self.temperature, self.standardize, self.max_tokens, self.compiled)

    def non_defaults(self) -> dict[str, object]:
        default = EngineOptions()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}


@dataclass(frozen=True)
class LayerPair:
    """The two contributions to one layer, as the policies see them."""

    subject: Delta
    style: Delta
    geometry: LayerGeometry


class Policy:
    """A rule with the same weights for every unit of a layer and step gives them by :meth:`fixed`; a rule that
    reads the divergences decides on the device by :meth:`decide`."""

    needs_divergence = False
    one_hot = True  # every unit gets exactly one of the two LoRAs, at weight 1
    # The weights of the subject's and the style's delta on a layer (or part) only that LoRA touches: there is
    # nothing to choose, so it gets its LoRA; the one-LoRA methods leave the other LoRA out of every layer.
    lone = (1.0, 1.0)
    two_weights = False  # decide gives each unit a (subject, style) weight pair, not one weight

    def subject_weight(self, decision: Tensor) -> Tensor:
        """The subject's part of a decision, as the log keeps it."""
        return decision[..., 0] if self.two_weights else decision

    def __init__(self, options: EngineOptions) -> None:
        self.options = options

    def prepare(self, layers: Mapping[str, LayerPair]) -> None:
        """Called once per generation with every layer both LoRAs touch."""

    def fixed(self, layer: str, progress: float, step: int) -> tuple[float, float]:
        """The weights of the subject and of the style delta for every unit of ``layer`` at this step."""
        raise NotImplementedError

    def decide(self, sums: Tensor, tokens: int) -> Tensor:
        """From the divergences ``[2, units]`` summed over ``tokens`` tokens: the winner's index per unit
        (0 = subject) for a hard rule, the subject's weight per unit for a soft one."""
        raise NotImplementedError


class StaticPolicy(Policy):
    one_hot = False

    def __init__(self, options: EngineOptions, subject: float = 1.0, style: float = 1.0) -> None:
        super().__init__(options)
        self.weights = self.lone = (subject, style)

    def fixed(self, layer, progress, step):
        return self.weights


class KLPolicy(Policy):
    """The paper's rule: the LoRA that moves the layer's output distribution more wins (ties go to the subject,
    as argmax returns the first maximum)."""

    needs_divergence = True

    def decide(self, sums, tokens):
        return sums.argmax(0)


class KLSoftPolicy(Policy):
    """Both LoRAs, weighted by softmax(log divergence / soft temperature) over the two: the subject's weight is
    d_s^(1/T) / (d_s^(1/T) + d_t^(1/T)), its share of the two divergences at T = 1, nearer the hard switch (kl) as T
    goes to 0.

    The temperature is relative to the divergences' own scale, which depends on the model, the layer and the
    measure: a mean KL divergence per token is often 0.001-0.1, where a softmax of the divergences themselves
    would give every layer nearly half of each LoRA."""

    needs_divergence = True
    one_hot = False

    def decide(self, sums, tokens):
        # Summed over the same tokens, the two sums are in the divergences' ratio; two zeros share equally. At the
        # default temperature 1 the scaling is skipped: one launch fewer on the hot path.
        logs = sums.clamp_min(_TINY).log_()
        if self.options.soft_temperature != 1.0:
            logs = logs.mul_(1.0 / self.options.soft_temperature)
        return torch.softmax(logs, dim=0)[0]


_TINY = 1e-30  # a divergence of 0 as the least positive one, whose log the softmax can take


class KLEvenPolicy(Policy):
    """Both LoRAs, the louder one turned down towards the quieter: each LoRA's weight is
    min(1, (other's divergence / its own) ** even_power). The quieter LoRA keeps its full weight; the louder one,
    which would take the layer over, gets less the more it outweighs the other (power 0 is the static merge; a
    negative power turns the quieter one down instead, towards ``kl``'s hard choice)."""

    needs_divergence = True
    one_hot = False
    two_weights = True

    def decide(self, sums, tokens):
        d = sums.clamp_min(_TINY)
        # [2, units(, parts)] -> [units(, parts), 2]
        return (d.flip(0) / d).pow_(self.options.even_power).clamp_(max=1.0).movedim(0, -1)


class SwitchPolicy(Policy):
    """LoRA Switch: the whole UNet alternates between the LoRAs every ``switch_every`` steps, subject first."""

    def fixed(self, layer, progress, step):
        subject = (step // self.options.switch_every) % 2 == 0
        return float(subject), float(not subject)


class KLoraPolicy(Policy):
    """K-LoRA (Ouyang et al. 2025): top-K magnitude sums of ΔW, balanced by γ and scaled by a time schedule.

    Everything except the schedule is input-independent, so each layer's ratio R = (S_c / γ) / S_s is computed
    once per generation; the subject wins while R >= S(t). K = r_subject·r_style uses each delta's ``rank``:
    the factors' rank for a low-rank delta, the nominal rank the host gives (or the matrix rank bound) for a
    dense one.
    """

    def __init__(self, options: EngineOptions) -> None:
        super().__init__(options)
        self.ratio: dict[str, float] = {}
        self.gamma = 1.0

    def prepare(self, layers: Mapping[str, LayerPair]) -> None:
        top_k: dict[str, tuple[float, float]] = {}
        l1_ratio: dict[str, float] = {}
        for name, pair in layers.items():
            w_c = pair.subject.dense_weight(pair.geometry).abs().flatten()
            w_s = pair.style.dense_weight(pair.geometry).abs().flatten()
            k = min(pair.subject.rank * pair.style.rank, w_c.numel())
            top_k[name] = (float(w_c.topk(k).values.sum()), float(w_s.topk(k).values.sum()))
            l1_ratio[name] = float(w_c.sum()) / max(float(w_s.sum()), 1e-30)
        self.gamma = robust_mean(list(l1_ratio.values()))
        self.ratio = {name: (s_c / self.gamma) / max(s_s, 1e-30) for name, (s_c, s_s) in top_k.items()}

    def scale(self, progress: float) -> float:
        """The time schedule at ``progress`` (0 at pure noise).

        S(t) = α·t + β with the user's α and β. S*(t) = (α·t + 0.85·α) mod α is the reference code's
        alternative (method.md 3.1): its offset is fixed at 0.85·α, so ``klora_beta`` does not apply to it.
        """
        alpha = self.options.klora_alpha
        if self.options.klora_schedule == "S*":
            return (alpha * progress + 0.85 * alpha) % alpha
        return alpha * progress + self.options.klora_beta

    def subject_wins(self, layer: str, progress: float) -> bool:
        return self.ratio[layer] >= self.scale(progress)

    def style_steps(self, layer: str, total: int) -> list[int]:
        """The steps of a ``total``-step generation at which the style wins ``layer``, decided as the engine
        decides them."""
        return [i for i in range(total) if not self.subject_wins(layer, StepClock(i, total).progress)]

    def fixed(self, layer, progress, step):
        subject = self.subject_wins(layer, progress)
        return float(subject), float(not subject)


def robust_mean(values: list[float]) -> float:
    """K-LoRA's γ: the mean of the per-layer L1 ratios, re-taken without the layers at 3× the mean or more."""
    if not values:
        return 1.0
    mean = sum(values) / len(values)
    kept = [v for v in values if v < 3 * mean]
    return sum(kept) / len(kept) if kept else mean


def make_policy(options: EngineOptions) -> Policy:
    options.validate()
    builders = {
        "kl": KLPolicy,
        "kl-even": KLEvenPolicy,
        "kl-soft": KLSoftPolicy,
        "k-lora": KLoraPolicy,
        "switch": SwitchPolicy,
        "static": StaticPolicy,
        "subject-only": lambda o: StaticPolicy(o, 1.0, 0.0),
        "style-only": lambda o: StaticPolicy(o, 0.0, 1.0),
    }
    return builders[options.method](options)
