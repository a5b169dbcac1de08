"""``python -m lib_dynfuse.bench --quality``: the scored comparison of every method in the bundled world.

    python -m lib_dynfuse.bench --quality                          # every method, with and without guidance
    python -m lib_dynfuse.bench --quality --sweep temperature=0.5,1,2 --sweep standardize=true,false
    python -m lib_dynfuse.bench --quality --set decide_per=row --no-guidance --seeds 16
    python -m lib_dynfuse.bench --quality --retrain                # retrain the bundled weights first (seeded)
    python -m lib_dynfuse.bench --quality --pair all --no-guidance --seeds 8   # every registered pair
    python -m lib_dynfuse.bench --quality --pair-file my_pairs.py  # pairs of your own (lib_dynfuse.quality.pairs)

Any EngineOptions field can be set (--set) or swept (--sweep), and so can the guidance parameters as
guidance_strength, guidance_balance, guidance_start, guidance_end, guidance_every, and the LoRAs' tag weights as
subject_strength and style_strength. Each pair is compared with its own best static merge (both weights swept over
--static-weights); the mean over the pairs that are not tuning pairs is the held-out score. The tables, a picture
grid per pair (methods × seeds) and the JSON go to --out; the last line printed is the JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Sequence

import torch

from lib_dynfuse.quality import compare, pairs, train
from lib_dynfuse.quality.model import ASSETS, SCORERS_FILE, World, load_scorers


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
    parser.add_argument("--static-weights", default="0.25,0.5,0.75,1,1.25",
                        help="weights of the static sweep (both LoRAs; default 0.25 to 1.25: 25 merges)")
    parser.add_argument("--pair", action="append", default=None, metavar="NAME",
                        help=f"a registered pair (repeatable; 'all': every one; default {pairs.ORIGINAL}); "
                             f"bundled: {', '.join(pairs.PAIRS)}")
    parser.add_argument("--pair-file", action="append", default=[], metavar="PATH",
                        help="a Python file that registers pairs (lib_dynfuse.quality.pairs); compares on its pairs "
                             "(with --pair, on those too)")
    parser.add_argument("--cache", default="out/quality-pairs",
                        help="folder for what --pair-file pairs need trained: LoRAs and, for subjects or styles the "
                             "bundled scorers do not know, scorers")
    parser.add_argument("--methods", default=None,
                        help=f"the dynamic methods to run (comma list of {', '.join(l for l, _ in compare.DYNAMIC)}; "
                             "default all)")
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
        methods = None if args.methods is None else args.methods.split(",")
        unknown = [m for m in methods or () if m not in {label for label, _ in compare.DYNAMIC}]
        if unknown:
            raise ValueError(f"unknown method {', '.join(unknown)} in --methods")
        names = [name for path in args.pair_file for name in pairs.load_pair_file(path)]
        for name in args.pair or ([] if names else [pairs.ORIGINAL]):
            if name == "all":
                names += [n for n in pairs.PAIRS if n not in names]
            elif name not in pairs.PAIRS:
                raise ValueError(f"unknown pair {name!r}; registered: {', '.join(pairs.PAIRS)}")
            elif name not in names:
                names.append(name)
    except ValueError as error:
        parser.error(str(error))
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.retrain:
        train.retrain(args.assets, recipe, log=log)
    world_model = World.load(args.assets)
    summaries, differences = {}, {}
    os.makedirs(args.out, exist_ok=True)
    for name in names:
        log(f"pair {name}: {pairs.PAIRS[name].note}")
        model = pair_world(world_model, pairs.PAIRS[name], args.assets, args.cache, recipe, log)
        summary, results = compare.compare(
            model, seeds=args.seeds, prompts=args.prompt or compare.PROMPTS, steps=args.steps, cfg_scale=args.cfg,
            base=base, sweeps=sweeps, sweep_methods=args.sweep_methods.split(","), guided=not args.no_guidance,
            static_weights=static_weights, methods=methods, log=log)
        grid_path = os.path.join(args.out, "quality_grid.png" if len(names) == 1 else f"quality_grid_{name}.png")
        compare.grid(results).save(grid_path)
        summary["grid"] = grid_path
        summaries[name], differences[name] = summary, compare.versus_best(results)
        print(f"pair {name}")
        print(compare.table(summary))
        print(f"best static: {summary['best_static']['row']}; sanity rows hold: {summary['sanity_ok']}")
        if not summary["sanity_ok"]:
            print("warning: the sanity rows do not hold (subject-only should beat style-only on subject and lose "
                  "on style); the scores of this run do not measure what they should", file=sys.stderr)
    tuning = [n for n in names if n in pairs.TUNING_PAIRS]
    held = [n for n in names if n not in pairs.TUNING_PAIRS]
    out = {**summaries[names[0]], "pairs": summaries, "tuning_pairs": tuning,
           "held_out": compare.held_out(differences, held)}
    print(compare.pairs_table(summaries, differences, held))
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0


def pair_world(model: World, pair: pairs.Pair, assets: str, cache: str, recipe: train.Recipe, log) -> World:
    """``model`` with the pair's LoRA files (a bundled pair's from ``assets``, trained into ``cache`` if missing
    there or for any other pair) and scorers that know its subject and style (trained into ``cache`` when the
    bundled ones do not)."""
    subject_file, style_file = train.lora_files(pair, assets)
    if not (pair.bundled and subject_file.is_file() and style_file.is_file()):
        subject_file, style_file = train.ensure_pair_loras(pair, cache, assets, log=log)
    known = model.classes
    scorers = None
    if pairs.SUBJECTS[pair.subject].shape not in known["object"] or pair.style not in known["style"]:
        classes = pairs.scorer_classes()
        tag = hashlib.sha1(json.dumps([classes, dataclasses.asdict(recipe)]).encode()).hexdigest()[:10]
        path = os.path.join(cache, f"scorers-{tag}.safetensors")
        if not os.path.isfile(path):
            log(f"training scorers for {', '.join(classes['object'])} / {', '.join(classes['style'])} into {path}")
            os.makedirs(cache, exist_ok=True)
            train.train_scorers(path, classes, recipe, log=log, keep=os.path.join(assets, SCORERS_FILE))
        scorers = load_scorers(path)
    return model.with_pair(pair.name, subject_file, style_file, scorers)
