"""Does confining a concept's edit to its own word's tokens help? On DEVELOPMENT instances, one concept per
instance trained the paper's way (the gate reads every token) and one trained with the edit confined to the concept
word's tokens (TrainConfig.gate_scope="word", PERFUSION.md §11c); each rendered at gate biases 0.5, 0.7, 0.9 with
the benchmark's 8 prompts × 2 seeds, the paper's concept in both render scopes; then every pair of the instances
rendered together (the pairs part's prompts and scoring) in each combination of training and render scope.

Why: on the toy world 25-44% of a prompt's other tokens open the gate at β 0.7 (ridge-dev-sweep.json): a causal
text encoder carries the concept past its word, the edit rewrites the keys and values of "on a beach" too, and two
concepts in one prompt fuse. A word scope stops that by construction -- and with it most of what the bias does,
since the gate at the concept's own token is nearly open at every β.

    python scripts/scope_sweep.py                       # tealcat, patchcat, blazedog (~25 min on 2 cores)
    python scripts/scope_sweep.py --instances tealcat --out /tmp/scope.json

Writes docs/benchmarks/scope-dev-sweep.json (resumable: finished cells are kept).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from itertools import combinations
from pathlib import Path

BIASES = (0.5, 0.7, 0.9)
# cell id -> (training scope, render scope)
CELLS = {"prompt": ("prompt", "prompt"), "prompt-rendered-word": ("prompt", "word"), "word": ("word", "word")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", default="tealcat,patchcat,blazedog")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the benchmark's, 400)")
    ap.add_argument("--prompts", type=int, default=None, help="only the first N prompts and pair prompts (a smoke run)")
    ap.add_argument("--out", default="docs/benchmarks/scope-dev-sweep.json")
    args = ap.parse_args()

    from perfusion_cli.bench.pairs import WORDS, score_pair
    from perfusion_cli.bench.quality import Bench, development_config
    from perfusion_cli.errors import PerfusionError
    from perfusion_cli.rendering import Applied, Gate
    from perfusion_cli.toyworld import world as tw

    try:
        qc = development_config(args.instances, steps=args.steps)
    except PerfusionError as e:
        raise SystemExit(f"error: {e}")
    names = list(qc.instances)
    if args.prompts:
        qc = replace(qc, prompts=qc.prompts[:args.prompts], pair_prompts=qc.pair_prompts[:args.prompts])
    bench = Bench(qc, progress=lambda *a: None, say=print)
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc.update({"what": __doc__.splitlines()[0], "prompts": list(bench.cfg.prompts),
                "pair_prompts": list(bench.cfg.pair_prompts), "seeds": bench.cfg.seeds, "steps": bench.cfg.steps,
                "biases": list(BIASES), "cells": {k: {"train": t, "render": r} for k, (t, r) in CELLS.items()},
                "command": "python scripts/scope_sweep.py --instances " + args.instances +
                           (f" --steps {args.steps}" if args.steps else "")})
    res = doc.setdefault("results", {})
    concepts: dict[tuple[str, str], object] = {}

    def concept(name: str, scope: str):
        if (name, scope) not in concepts:
            t = time.perf_counter()
            concepts[(name, scope)] = bench.train_perfusion(name, f"{name} {scope}", gate_scope=scope)
            print(f"{name}: trained ({scope} scope) in {time.perf_counter() - t:.0f} s", flush=True)
        return concepts[(name, scope)]

    def save() -> None:
        out.write_text(json.dumps(doc, indent=1))

    for name in names:
        r = res.setdefault(name, {})
        if "base model" not in r:
            bp = bench.base_point(name)
            r["base model"] = {"alignment": round(bp["alignment"], 4), "fidelity": round(bp["fidelity"], 4)}
        for cell, (train, render) in CELLS.items():
            if cell in r:
                continue
            c = concept(name, train)
            points = {}
            for b in BIASES:
                pt = bench.point(name, [c], {"gates": {c.name: Gate(b, c.tensors.tau, scope=render)}})
                points[f"{b:g}"] = {"alignment": round(pt["alignment"], 4), "fidelity": round(pt["fidelity"], 4),
                                    "alignment_per_image": pt["alignment_per_image"],
                                    "fidelity_per_image": pt["fidelity_per_image"]}
            r[cell] = {"points": points}
            print(name, cell, {k: (v["alignment"], v["fidelity"]) for k, v in points.items()}, flush=True)
            save()

    pairs = doc.setdefault("pairs", {})
    for a, b in combinations(names, 2):
        row = pairs.setdefault(f"{a}+{b}", {})
        sup = {n: tw.INSTANCES_BY_NAME[n].supercategory for n in (a, b)}
        captions = [p.format(a=sup[a], b=sup[b]) for p in bench.cfg.pair_prompts]
        prompts = [p.format(a=WORDS[0], b=WORDS[1]) for p in bench.cfg.pair_prompts]
        for cell, (train, render) in CELLS.items():
            if cell in row:
                continue
            cs = [replace(concept(n, train), name=w) for n, w in zip((a, b), WORDS)]
            gates = {w: Gate(c.tensors.beta, c.tensors.tau, scope=render) for w, c in zip(WORDS, cs)}
            with Applied(bench.base.pipe, cs, bench.cov.C, gates=gates) as applied:
                s = score_pair(bench.images(bench.applied_call(applied), prompts), captions, a, b)
            row[cell] = {k: v for k, v in s.items()}
            print(f"{a}+{b}", cell, {k: round(v, 3) for k, v in s.items() if isinstance(v, float)}, flush=True)
            save()

    summary: dict = {"single": {}, "pairs": {}}
    for cell in CELLS:
        cells = [r[cell] for r in res.values() if cell in r]
        summary["single"][cell] = {
            b: {"alignment": round(sum(c["points"][b]["alignment"] for c in cells) / len(cells), 4),
                "fidelity": round(sum(c["points"][b]["fidelity"] for c in cells) / len(cells), 4)}
            for b in (f"{x:g}" for x in BIASES)} if cells else {}
        rows = [r[cell] for r in pairs.values() if cell in r]
        summary["pairs"][cell] = {k: round(sum(r[k] for r in rows) / len(rows), 4)
                                  for k in ("both_recognised", "recognised_a", "recognised_b", "asked_kinds",
                                            "alignment")} if rows else {}
    base = [r["base model"] for r in res.values()]
    summary["base model"] = {k: round(sum(x[k] for x in base) / len(base), 4) for k in ("alignment", "fidelity")}
    doc["summary"] = summary
    save()
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
