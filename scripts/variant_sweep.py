"""Training variants of Perfusion against the paper's, on DEVELOPMENT instances: one concept per instance and
variant, each rendered at gate biases 0.5, 0.7, 0.9 with the benchmark's 8 prompts × 2 seeds, then every pair of the
instances rendered together (the pairs part's prompts and scoring). The cells (--cells):

    prompt                the paper: the gate reads every token (PERFUSION.md §2)
    prompt-rendered-word  the paper's concept, its edit confined to the concept word's tokens at render (§11c)
    word                  trained and rendered with the edit confined to the concept word's tokens (§11c)
    class-noun            the prompt keeps the supercategory after the concept's token, "a <c> cat" (§11d), as
                          DreamBooth's, LoRA's and Custom Diffusion's recipes do

Why the word scope: on the toy world 25-44% of a prompt's other tokens open the gate at β 0.7 (ridge-dev-sweep.json):
a causal text encoder carries the concept past its word, the edit rewrites the keys and values of "on a beach" too,
and two concepts in one prompt fuse. A word scope stops that by construction -- and with it most of what the bias
does, since the gate at the concept's own token is nearly open at every β. Why the class noun: the baselines that
keep it stay at the base model's alignment (quality.md), where Perfusion's concept, which takes the word's place,
loses 0.03-0.08.

    python scripts/variant_sweep.py                     # the scope cells: tealcat, patchcat, blazedog (~25 min on 2 cores)
    python scripts/variant_sweep.py --cells prompt,class-noun --out docs/benchmarks/class-noun-dev-sweep.json
    python scripts/variant_sweep.py --instances tealcat --out /tmp/scope.json

Writes --out (default docs/benchmarks/scope-dev-sweep.json; resumable: finished cells are kept).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from itertools import combinations
from pathlib import Path

BIASES = (0.5, 0.7, 0.9)
# cell id -> (TrainConfig overrides, render scope)
CELLS = {"prompt": ({}, "prompt"), "prompt-rendered-word": ({}, "word"), "word": ({"gate_scope": "word"}, "word"),
         "class-noun": ({"class_noun": True}, "prompt")}
SCOPE_CELLS = ("prompt", "prompt-rendered-word", "word")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", default="tealcat,patchcat,blazedog")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the benchmark's, 400)")
    ap.add_argument("--prompts", type=int, default=None, help="only the first N prompts and pair prompts (a smoke run)")
    ap.add_argument("--out", default="docs/benchmarks/scope-dev-sweep.json")
    ap.add_argument("--cells", default=",".join(SCOPE_CELLS), help=f"comma-separated, of: {', '.join(CELLS)}")
    args = ap.parse_args()
    cells = {c: CELLS[c] for c in (x.strip() for x in args.cells.split(",")) if c}
    unknown = [c for c in args.cells.split(",") if c.strip() and c.strip() not in CELLS]
    if unknown or not cells:
        raise SystemExit(f"error: unknown cell(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(CELLS)}")

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
                "biases": list(BIASES),
                "cells": {**doc.get("cells", {}), **{k: {"train": t, "render": r} for k, (t, r) in cells.items()}},
                "command": f"python scripts/variant_sweep.py --instances {args.instances} --cells {args.cells}"
                           f" --out {args.out}" + (f" --steps {args.steps}" if args.steps else "")})
    res = doc.setdefault("results", {})
    concepts: dict[tuple[str, str], object] = {}

    def concept(name: str, train: dict):
        key = (name, json.dumps(train, sort_keys=True))
        if key not in concepts:
            t = time.perf_counter()
            concepts[key] = bench.train_perfusion(name, f"{name} {train or 'paper'}", **train)
            print(f"{name}: trained ({train or 'the paper'}) in {time.perf_counter() - t:.0f} s", flush=True)
        return concepts[key]

    def save() -> None:
        out.write_text(json.dumps(doc, indent=1))

    for name in names:
        r = res.setdefault(name, {})
        if "base model" not in r:
            bp = bench.base_point(name)
            r["base model"] = {"alignment": round(bp["alignment"], 4), "fidelity": round(bp["fidelity"], 4)}
        for cell, (train, render) in cells.items():
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
        for cell, (train, render) in cells.items():
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
        done = [r[cell] for r in res.values() if cell in r]
        if not done:
            continue
        summary["single"][cell] = {
            b: {"alignment": round(sum(c["points"][b]["alignment"] for c in done) / len(done), 4),
                "fidelity": round(sum(c["points"][b]["fidelity"] for c in done) / len(done), 4)}
            for b in (f"{x:g}" for x in BIASES)}
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
