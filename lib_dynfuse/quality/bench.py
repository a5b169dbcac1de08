"""``python -m lib_dynfuse.bench --quality``: the scored comparison of every method in the bundled world.

    python -m lib_dynfuse.bench --quality                          # every method, with and without guidance
    python -m lib_dynfuse.bench --quality --sweep temperature=0.5,1,2 --sweep standardize=true,false
    python -m lib_dynfuse.bench --quality --set decide_per=row --no-guidance --seeds 16
    python -m lib_dynfuse.bench --quality --retrain                # retrain the bundled weights first (seeded)

Any EngineOptions field can be set (--set) or swept (--sweep), and so can the guidance parameters as
guidance_strength, guidance_balance, guidance_start, guidance_end, guidance_every, and the LoRAs' tag weights as
subject_strength and style_strength. The table, a picture grid
(methods × seeds) and the JSON go to --out; the last line printed is the JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import torch

from lib_dynfuse.quality import compare, train
from lib_dynfuse.quality.model import ASSETS, World


def _recipe(assignments: Sequence[str]) -> train.Recipe:
    kinds = {f.name: type(f.default) for f in dataclasses.fields(train.Recipe)}
    values = {}
    for text in assignments:
        name, _, value = text.partition("=")
        if name not in kinds:
            raise ValueError(f"unknown recipe field {name!r}; known: {', '.join(kinds)}")
        values[name] = kinds[name](value)
    return train.Recipe(**values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_dynfuse.bench --quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retrain", action="store_true", help="retrain the world's weights into --assets first")
    parser.add_argument("--recipe", action="append", default=[], metavar="FIELD=VALUE",
                        help="with --retrain: change a training length (e.g. base_steps=300)")
    parser.add_argument("--assets", default=str(ASSETS), help="folder of the world's weights (default: bundled)")
    parser.add_argument("--seeds", type=int, default=64, help="seeds per prompt (default 64)")
    parser.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; default three)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--cfg", type=float, default=1.5, help="CFG scale (default 1.5)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="an EngineOptions field, guidance_<param> or <subject|style>_strength for every row")
    parser.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                        help="extra rows for each value (several --sweep: every combination)")
    parser.add_argument("--sweep-methods", default="kl", help="methods the sweep rows use (comma list, default kl)")
    parser.add_argument("--static-weights", default="0.5,0.75,1", help="weights of the static sweep (both LoRAs)")
    parser.add_argument("--no-guidance", action="store_true", help="leave out the guided rows")
    parser.add_argument("--out", default="out/quality", help="folder for quality.json and quality_grid.png")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        base = {}
        for text in args.set:
            name, values = compare.parse_assignment(text)
            base[name] = values[0]
        sweeps = [compare.parse_assignment(text) for text in args.sweep]
        static_weights = [float(w) for w in args.static_weights.split(",")]
        recipe = _recipe(args.recipe)
    except ValueError as error:
        parser.error(str(error))
    if args.retrain:
        train.retrain(args.assets, recipe, log=lambda line: print(line, flush=True))
    model = World.load(args.assets)
    summary, results = compare.compare(
        model, seeds=args.seeds, prompts=args.prompt or compare.PROMPTS, steps=args.steps, cfg_scale=args.cfg,
        base=base, sweeps=sweeps, sweep_methods=args.sweep_methods.split(","), guided=not args.no_guidance,
        static_weights=static_weights, log=lambda line: print(line, flush=True))
    os.makedirs(args.out, exist_ok=True)
    grid_path = os.path.join(args.out, "quality_grid.png")
    compare.grid(results).save(grid_path)
    summary["grid"] = grid_path
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(compare.table(summary))
    print(f"best static: {summary['best_static']['row']}; sanity rows hold: {summary['sanity_ok']}")
    if not summary["sanity_ok"]:
        print("warning: the sanity rows do not hold (subject-only should beat style-only on subject and lose on "
              "style); the scores of this run do not measure what they should", file=sys.stderr)
    print(json.dumps(summary))
    return 0
