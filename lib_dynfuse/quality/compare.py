"""The scored comparison of every method in the world: subject, style and prompt scores with 95 % confidence
intervals, the best static merge from a weight sweep, a picture grid and one JSON object.

Every row generates the same prompts × seeds with the same sampler; only the fusion rule (and, for the guided
rows, the guidance correction) differs, so rows are compared image by image. Scores come from the *judge*
encoders; guidance steers with the independently trained *guide* encoders.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from lib_dynfuse.guidance import GuidanceParams
from lib_dynfuse.engine.policies import EngineOptions
from lib_dynfuse.quality import world
from lib_dynfuse.quality.model import World

PROMPTS = ("a sks, zwx style", "a big sks, zwx style", "a small sks, zwx style")
STATIC_WEIGHTS = (0.25, 0.5, 0.75, 1.0, 1.25)  # both LoRAs' weights: 25 merges
SCORES = ("subject", "style", "prompt", "balance")
# The dynamic methods every comparison runs, as (label, EngineOptions overrides).
DYNAMIC = (("kl", {"method": "kl"}), ("kl-even", {"method": "kl-even"}), ("kl-soft", {"method": "kl-soft"}),
           ("k-lora S", {"method": "k-lora", "klora_schedule": "S"}),
           ("k-lora S*", {"method": "k-lora", "klora_schedule": "S*"}), ("switch", {"method": "switch"}))
GUIDANCE_PREFIX = "guidance_"
STRENGTHS = ("subject_strength", "style_strength")  # the LoRAs' tag weights, sweepable like the options
DEFAULT_METHOD = EngineOptions().method
CHOOSING = ("kl", "kl-even", "kl-soft", "k-lora", "switch")  # the methods whose decisions make a subject share


@dataclass(frozen=True)
class Row:
    label: str
    engine: dict = field(default_factory=dict)  # EngineOptions fields
    subject_strength: float = 1.0
    style_strength: float = 1.0
    guided: bool = False
    guidance: dict = field(default_factory=dict)  # GuidanceParams fields

    def options(self) -> EngineOptions:
        return EngineOptions(**self.engine)

    def params(self) -> GuidanceParams:
        return GuidanceParams(**self.guidance)

    @property
    def name(self) -> str:
        return f"{self.label} + guidance" if self.guided else self.label


@dataclass
class Result:
    row: Row
    scores: dict[str, Tensor]  # per image
    selection: Tensor | None  # mean subject weight, [layers, steps], for the methods that choose
    layers: list[str]
    seconds: float
    images: Tensor

    @property
    def subject_share(self) -> float | None:
        return None if self.selection is None else float(self.selection.mean())

    def share_by_block(self) -> dict[str, float]:
        """Subject share per UNet block (``down_blocks.0``, ``mid_block``, ``up_blocks.2``, ...)."""
        blocks: dict[str, list[int]] = {}
        for i, name in enumerate(self.layers):
            parts = name.split(".")
            blocks.setdefault(".".join(parts[:1] if parts[0] == "mid_block" else parts[:2]), []).append(i)
        return {block: round(float(self.selection[rows].mean()), 3) for block, rows in blocks.items()}

    def share_by_step(self) -> list[float]:
        return [round(float(v), 3) for v in self.selection.mean(0)]


# ---- option parsing (any EngineOptions field, and the guidance parameters as guidance_<field>) ---------------

def _field_types() -> dict[str, type]:
    types = {f.name: type(f.default) for f in dataclasses.fields(EngineOptions)}
    types |= {GUIDANCE_PREFIX + f.name: type(f.default) for f in dataclasses.fields(GuidanceParams)}
    return types | {name: float for name in STRENGTHS}


def parse_value(name: str, text: str) -> object:
    kinds = _field_types()
    if name not in kinds:
        raise ValueError(f"unknown option {name!r}; known: {', '.join(sorted(kinds))}")
    kind = kinds[name]
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "on", "off"):
            raise ValueError(f"{name} takes true or false, not {text!r}")
        return text.lower() in ("true", "1", "on")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name} takes a {kind.__name__}, not {text!r}") from None


def parse_assignment(text: str) -> tuple[str, list[object]]:
    """``temperature=0.5,1,2`` → ``("temperature", [0.5, 1.0, 2.0])``, typed by the option's default."""
    name, sep, values = text.partition("=")
    if not sep or not values:
        raise ValueError(f"expected NAME=VALUE[,VALUE...], not {text!r}")
    name = name.strip().replace("-", "_")
    return name, [parse_value(name, v.strip()) for v in values.split(",")]


def _split(settings: dict[str, object]) -> tuple[dict, dict, dict]:
    """Engine options, guidance parameters (without their prefix) and LoRA weights."""
    engine = {k: v for k, v in settings.items() if not k.startswith(GUIDANCE_PREFIX) and k not in STRENGTHS}
    guidance = {k[len(GUIDANCE_PREFIX):]: v for k, v in settings.items() if k.startswith(GUIDANCE_PREFIX)}
    return engine, guidance, {k: v for k, v in settings.items() if k in STRENGTHS}


# ---- the rows -----------------------------------------------------------------------------------------------

def plan_rows(*, base: dict[str, object] | None = None, sweeps: Sequence[tuple[str, list[object]]] = (),
              sweep_methods: Sequence[str] = ("kl",), guided: bool = True,
              static_weights: Sequence[float] = STATIC_WEIGHTS,
              methods: Sequence[str] | None = None) -> tuple[list[Row], list[Row], list[Row]]:
    """(anchor and method rows without guidance, the static sweep rows, the rows with guidance); the best static
    with guidance is added once the sweep has picked its weights. ``base`` settings apply to every row: engine
    options to the dynamic rules, guidance_* to the guided rows, subject_strength / style_strength (the tag
    weights) to every row but the single-LoRA anchors and the static sweep. ``methods``: the labels of DYNAMIC to
    run (default all)."""
    engine, guidance, weights = _split(dict(base or {}))
    rows = [Row("subject-only", {"method": "subject-only"}), Row("style-only", {"method": "style-only"}),
            Row("static", {"method": "static"}, **weights)]
    dynamic = [(label, o) for label, o in DYNAMIC if methods is None or label in methods]
    rows += [Row(label, {**engine, **overrides}, **weights) for label, overrides in dynamic]
    names = [name for name, _ in sweeps]
    for values in itertools.product(*(v for _, v in sweeps)) if sweeps else ():
        setting = dict(zip(names, values))
        s_engine, s_guidance, s_weights = _split(setting)
        tag = " ".join(f"{k}={v}" for k, v in setting.items())
        for method in sweep_methods:
            rows.append(Row(f"{method} {tag}", {**engine, "method": method, **s_engine}, guided=bool(s_guidance),
                            guidance={**guidance, **s_guidance}, **{**weights, **s_weights}))
    static = [Row(f"static {s:g}/{t:g}", {"method": "static"}, s, t)
              for s in static_weights for t in static_weights if (s, t) != (1.0, 1.0)]
    # With guidance: the dynamic rules (the best static with guidance is added once the sweep has run).
    guided_rows = [dataclasses.replace(r, guided=True, guidance=guidance) for r in rows[3:3 + len(dynamic)]] \
        if guided else []
    return rows, static, guided_rows


# ---- running ------------------------------------------------------------------------------------------------

def run_row(model: World, row: Row, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, cfg_scale: float,
            judge, batch: int = 256) -> Result:
    start = time.time()
    pairs = [(p, s) for p in prompts for s in seeds]
    images, selection, layers = [], None, []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        session = model.fusion(row.options(), row.subject_strength, row.style_strength)
        guidance = model.guidance(row.params(), log=lambda message: None) if row.guided else None
        images.append(model.generate([p for p, _ in chunk], [s for _, s in chunk], steps=steps, cfg_scale=cfg_scale,
                                     session=session, guidance=guidance))
        if row.options().method in CHOOSING:
            layers, _, grid = session.log.matrix()
            share = grid * len(chunk) / len(pairs)
            selection = share if selection is None else selection + share
    images = torch.cat(images)
    scores = judge.scores(images, [p for p, _ in pairs])
    return Result(row, scores, selection, layers, time.time() - start, images)


def add_balance(results: list[Result], subject_only: Result, style_only: Result) -> None:
    """balance = mean of the subject score rescaled so that style-only is 0 and subject-only is 1, and the style
    score rescaled so that subject-only is 0 and style-only is 1: 1 means both as good as their own LoRA alone."""
    for r in results:
        add_balance_to_scores(r.scores, subject_only.scores, style_only.scores)


def add_balance_to_scores(scores: dict[str, Tensor], subject_only: dict[str, Tensor],
                          style_only: dict[str, Tensor]) -> None:
    """:func:`add_balance` for one row's scores, given the scores of both single-LoRA rows."""
    s_hi, s_lo = float(subject_only["subject"].mean()), float(style_only["subject"].mean())
    t_hi, t_lo = float(style_only["style"].mean()), float(subject_only["style"].mean())
    subject = (scores["subject"] - s_lo) / _nonzero(s_hi - s_lo)
    style = (scores["style"] - t_lo) / _nonzero(t_hi - t_lo)
    scores["balance"] = 0.5 * (subject + style)


def _nonzero(x: float) -> float:
    return x if abs(x) > 1e-9 else 1e-9


def mean_ci(values: Tensor) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (normal approximation; n ≥ 64 here)."""
    v = values.double()
    v = v[~torch.isnan(v)]
    if v.numel() < 2:
        return float(v.mean()) if v.numel() else math.nan, math.nan
    return float(v.mean()), float(1.96 * v.std() / math.sqrt(v.numel()))


def compare(model: World, *, seeds: int = 64, prompts: Sequence[str] = PROMPTS, steps: int = 20,
            cfg_scale: float = 1.5, base: dict[str, object] | None = None,
            sweeps: Sequence[tuple[str, list[object]]] = (), sweep_methods: Sequence[str] = ("kl",),
            guided: bool = True, static_weights: Sequence[float] = STATIC_WEIGHTS,
            methods: Sequence[str] | None = None,
            log: Callable[[str], None] = print) -> tuple[dict, list[Result]]:
    """Run every row; return the summary (the JSON object) and the per-row results."""
    seed_list = list(range(seeds))
    judge = model.judge()
    rows, static_rows, guided_rows = plan_rows(base=base, sweeps=sweeps, sweep_methods=sweep_methods, guided=guided,
                                               static_weights=static_weights, methods=methods)
    results: list[Result] = []

    def run(row: Row) -> Result:
        result = run_row(model, row, prompts, seed_list, steps=steps, cfg_scale=cfg_scale, judge=judge)
        results.append(result)
        log(f"  {row.name:<34} {result.seconds:6.1f}s  subject {float(result.scores['subject'].mean()):.3f}  "
            f"style {float(result.scores['style'].mean()):.3f}  prompt {float(result.scores['prompt'].mean()):.3f}")
        return result

    for row in rows + static_rows:
        run(row)
    add_balance(results, results[0], results[1])
    statics = [r for r in results if not r.row.guided and r.row.engine.get("method") == "static"]
    best = max(statics, key=lambda r: float(r.scores["balance"].mean()))
    best_weights = (best.row.subject_strength, best.row.style_strength)
    # The default rule at the best static's weights too: a rule is only better than the merge if it is better at
    # the weights a user would pick for the merge.
    engine, _, tag_weights = _split(dict(base or {}))
    default = DEFAULT_METHOD
    same_weights = Row(f"{default} {best_weights[0]:g}/{best_weights[1]:g}", {**engine, "method": default},
                       *best_weights)
    other_weights = best_weights != (tag_weights.get("subject_strength", 1.0), tag_weights.get("style_strength", 1.0))
    if other_weights:
        run(same_weights)
    for row in guided_rows:
        run(row)
    if guided_rows:
        guidance = guided_rows[0].guidance
        run(Row(f"best static {best_weights[0]:g}/{best_weights[1]:g}", {"method": "static"}, *best_weights,
                guided=True, guidance=guidance))
    add_balance(results, results[0], results[1])
    summary = summarise(results, best, prompts=prompts, seeds=seeds, steps=steps, cfg_scale=cfg_scale)
    summary["pair"] = model.pair
    return summary, results


def versus_best(results: list[Result]) -> dict[str, dict[str, Tensor]]:
    """Per method that chooses (by row label, at the tag weights), per image: the method minus the best static
    merge in balance and in prompt score, and with guidance the guided method minus the guided best static.
    Missing rows give no entry."""
    by_name = {r.row.name: r for r in results}
    statics = [r for r in results if not r.row.guided and r.row.engine.get("method") == "static"]
    best = max(statics, key=lambda r: float(r.scores["balance"].mean()))
    best_guided = by_name.get(f"best static {best.row.subject_strength:g}/{best.row.style_strength:g} + guidance")
    out: dict[str, dict[str, Tensor]] = {}
    for r in results:
        if r.row.engine.get("method") not in CHOOSING or r.row.label != r.row.engine.get("method"):
            continue
        entry = out.setdefault(r.row.label, {})
        if not r.row.guided:
            entry["balance"] = r.scores["balance"] - best.scores["balance"]
            entry["prompt"] = r.scores["prompt"] - best.scores["prompt"]
        elif best_guided is not None:
            entry["balance_guided"] = r.scores["balance"] - best_guided.scores["balance"]
    return out


def held_out(differences: dict[str, dict[str, dict[str, Tensor]]], pairs: Sequence[str]) -> dict:
    """For the default method (and under ``by_method`` for every method that ran on every pair): the mean over
    ``pairs`` of each pair's mean per-image difference to its best static merge, with the 95 % half-width of that
    mean of means (each pair's variance of its mean, summed, over the number of pairs squared)."""
    def mean_of_means(method: str, key: str) -> dict[str, float] | None:
        values = [differences[p][method][key].double() for p in pairs if key in differences[p].get(method, {})]
        if not values or len(values) < len(pairs):
            return None
        mean = sum(float(v.mean()) for v in values) / len(values)
        var = sum(float(v.var()) / v.numel() if v.numel() > 1 else math.nan for v in values) / len(values) ** 2
        return {"mean": round(mean, 4), "ci": round(1.96 * math.sqrt(var), 4)}

    def entry(method: str) -> dict:
        return {"minus_best_static": mean_of_means(method, "balance"),
                "minus_best_static_guided": mean_of_means(method, "balance_guided"),
                "prompt_minus_best_static": mean_of_means(method, "prompt")}

    methods = set.intersection(*(set(differences[p]) for p in pairs)) if pairs else set()
    default = entry(DEFAULT_METHOD)
    return {"pairs": list(pairs), "default_method": DEFAULT_METHOD,
            "default_minus_best_static": default["minus_best_static"],
            "default_minus_best_static_guided": default["minus_best_static_guided"],
            "prompt_default_minus_best_static": default["prompt_minus_best_static"],
            "by_method": {m: entry(m) for m in sorted(methods)}}


def summarise(results: list[Result], best: Result, **settings) -> dict:
    by_name = {r.row.name: r for r in results}
    subject_only, style_only = by_name["subject-only"], by_name["style-only"]
    sanity = {
        "subject_only_beats_style_only_on_subject":
            float(subject_only.scores["subject"].mean()) > float(style_only.scores["subject"].mean()),
        "subject_only_loses_to_style_only_on_style":
            float(subject_only.scores["style"].mean()) < float(style_only.scores["style"].mean()),
    }
    statics = [r for r in results if not r.row.guided and r.row.engine.get("method") == "static"]
    rows = []
    for r in results:
        entry = {"row": r.row.name, "method": r.row.engine.get("method"), "guided": r.row.guided,
                 "subject_strength": r.row.subject_strength, "style_strength": r.row.style_strength,
                 "options": {k: v for k, v in r.row.engine.items() if k != "method"}, "guidance": r.row.guidance,
                 "subject_share": None if r.selection is None else round(r.subject_share, 4),
                 "share_by_block": None if r.selection is None else r.share_by_block(),
                 "share_by_step": None if r.selection is None else r.share_by_step(),
                 "seconds": round(r.seconds, 1), "n": int(r.scores["subject"].numel())}
        for key in SCORES:
            mean, ci = mean_ci(r.scores[key])
            entry[key], entry[f"{key}_ci"] = round(mean, 4), round(ci, 4)
        entry["dominated_by_static"] = [s.row.name for s in statics if s is not r and _dominates(s, r)]
        rows.append(entry)
    versus = {}
    for r in results:
        if r.row.engine.get("method") in CHOOSING and not r.row.guided:
            mean, ci = mean_ci(r.scores["balance"] - best.scores["balance"])
            p_mean, p_ci = mean_ci(r.scores["prompt"] - best.scores["prompt"])
            versus[r.row.name] = {"balance_diff": round(mean, 4), "balance_diff_ci": round(ci, 4),
                                  "prompt_diff": round(p_mean, 4), "prompt_diff_ci": round(p_ci, 4)}
    return {"benchmark": "quality", **settings, "prompts": list(settings["prompts"]),
            "best_static": {"row": best.row.name, "subject_strength": best.row.subject_strength,
                            "style_strength": best.row.style_strength},
            "sanity": sanity, "sanity_ok": all(sanity.values()), "versus_best_static": versus, "rows": rows}


def _dominates(a: Result, b: Result) -> bool:
    """Whether ``a`` is at least as good as ``b`` on subject and on style, and better on one."""
    sa, ta = float(a.scores["subject"].mean()), float(a.scores["style"].mean())
    sb, tb = float(b.scores["subject"].mean()), float(b.scores["style"].mean())
    return sa >= sb and ta >= tb and (sa > sb or ta > tb)


# ---- presentation -------------------------------------------------------------------------------------------

def table(summary: dict) -> str:
    lines = [f"{'row':<36}{'subject':>16}{'style':>16}{'prompt':>16}{'balance':>16}{'subj.share':>11}"]
    for r in summary["rows"]:
        cells = "".join(f"{r[k]:>9.3f} ±{r[k + '_ci']:.3f}" for k in SCORES)
        share = "" if r["subject_share"] is None else f"{r['subject_share']:.2f}"
        best = "  <- best static" if r["row"] == summary["best_static"]["row"] else ""
        lines.append(f"{r['row']:<36}{cells}{share:>11}{best}")
    return "\n".join(lines)


def pairs_table(summaries: dict[str, dict], differences: dict[str, dict[str, Tensor]], held: Sequence[str]) -> str:
    """One line per pair: its best static merge, the default method and ``kl`` (balance, and the default's paired
    difference to the best static), then the held-out mean."""
    lines = [f"{'pair':<22}{'best static':>22}{'balance':>16}{DEFAULT_METHOD:>16}{'kl':>16}{'default - best':>18}"
             f"{'prompt diff':>16}"]
    for name, summary in summaries.items():
        rows = {r["row"]: r for r in summary["rows"]}
        best = rows[summary["best_static"]["row"]]

        def cell(row: dict | None) -> str:
            return f"{row['balance']:>9.3f} ±{row['balance_ci']:.3f}" if row else f"{'-':>16}"

        d = differences[name].get(DEFAULT_METHOD, {})
        diff = "".join(f"{float(d[k].mean()):>+10.3f} ±{mean_ci(d[k])[1]:.3f}" if k in d else f"{'-':>16}"
                       for k in ("balance", "prompt"))
        mark = "" if name in held else " (tuning)"
        lines.append(f"{name + mark:<22}{best['row']:>22}{cell(best)}{cell(rows.get(DEFAULT_METHOD))}"
                     f"{cell(rows.get('kl'))}{diff}")
    h = held_out(differences, held) if held else None
    for method, entry in (h["by_method"] if h else {}).items():
        cells = [f"{label} {d['mean']:+.3f} ±{d['ci']:.3f}" for label, d in
                 (("balance", entry["minus_best_static"]), ("with guidance", entry["minus_best_static_guided"]),
                  ("prompt", entry["prompt_minus_best_static"])) if d]
        lines.append(f"held-out mean of {method} - best static ({', '.join(held)}): {'; '.join(cells)}")
    return "\n".join(lines)


def grid(results: Sequence[Result], columns: int = 8, scale: int = 3) -> Image.Image:
    """Rows of images (methods) × columns (the first seeds of the first prompt), with the row names on the left."""
    label_w, cell = 190, world.SIZE * scale
    image = Image.new("RGB", (label_w + columns * cell, len(results) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, r in enumerate(results):
        for j in range(min(columns, r.images.shape[0])):
            tile = world.to_pil(r.images[j]).resize((cell, cell), Image.NEAREST)
            image.paste(tile, (label_w + j * cell, i * cell))
        draw.text((4, i * cell + cell // 2 - 6), r.row.name, fill=(0, 0, 0))
    return image
