"""Choose the embedding learning rate of Perfusion and of Textual Inversion for the toy model, on the toy world's
DEVELOPMENT instances only (the reporting instances stay unseen for `perfusion bench quality`).

For each instance and learning rate, one concept is trained exactly as `perfusion bench quality` trains it
(400 steps, 6 photos, batch 4) and rendered on the benchmark's 8 prompts × 2 seeds: Perfusion at gate biases
0.5, 0.7, 0.9 (its curve), TI once (its final concept). A learning rate's score is the mean over instances and
points of alignment + fidelity; the best one goes into registry/profiles/toyworld.yaml (Perfusion's `train:
lr_embedding`; TI's recipe is only changed if another rate beats its paper's 5e-3).

    python scripts/embedding_lr_sweep.py                      # tealcat, blazedog; ~20 min on 2 CPU cores
    python scripts/embedding_lr_sweep.py --instances tealcat --out /tmp/sweep.json
    python scripts/embedding_lr_sweep.py --instances patchcat,sockdog --perfusion-lrs 6e-3,4e-3,2.5e-3 --ti-lrs ""

The choice is made over every instance and rate the file holds, among the rates measured on all of them.

Writes docs/benchmarks/lr-embedding-dev-sweep.json (resumable: finished cells are kept).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PERFUSION_LRS = (6e-3, 2.5e-3, 1e-3)
TI_LRS = (5e-3, 2e-3, 1e-3)
BIASES = (0.5, 0.7, 0.9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", default="tealcat,blazedog")
    ap.add_argument("--out", default="docs/benchmarks/lr-embedding-dev-sweep.json")
    ap.add_argument("--perfusion-lrs", default=",".join(f"{x:g}" for x in PERFUSION_LRS))
    ap.add_argument("--ti-lrs", default=",".join(f"{x:g}" for x in TI_LRS))
    ap.add_argument("--embedding-max-ratio", type=float, default=None,
                    help="Perfusion: also hold the embedding's norm to this many times a word's (TrainConfig."
                         "embedding_max_ratio); its cells are keyed 'LR@maxR'")
    args = ap.parse_args()

    from perfusion_cli.bench.quality import WORD, Bench, development_config
    from perfusion_cli.methods import recipe, train_baseline
    from perfusion_cli.errors import PerfusionError
    from perfusion_cli.rendering import Gate
    from perfusion_cli.toyworld import world as tw

    rates = lambda text: [float(x) for x in text.split(",") if x.strip()]  # noqa: E731
    try:
        qc = development_config(args.instances)
    except PerfusionError as e:
        raise SystemExit(f"error: {e}")
    names = list(qc.instances)
    bench = Bench(qc, progress=lambda *a: None, say=print)
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc.update({"what": __doc__.splitlines()[0], "criterion": "mean over instances and points of alignment + fidelity",
                "prompts": list(bench.cfg.prompts), "seeds": bench.cfg.seeds, "steps": bench.cfg.steps})
    res = doc.setdefault("results", {})

    def score(name, concept, **opts):   # the benchmark's own point: its prompts and seeds, rendered and scored
        pt = bench.point(name, [concept], opts)
        return {"alignment": round(pt["alignment"], 4), "fidelity": round(pt["fidelity"], 4)}

    for name in names:
        r = res.setdefault(name, {})
        if "base model" not in r:
            bp = bench.base_point(name)
            r["base model"] = {"alignment": round(bp["alignment"], 4), "fidelity": round(bp["fidelity"], 4)}
        for method, lrs in (("perfusion", rates(args.perfusion_lrs)), ("ti", rates(args.ti_lrs))):
            for lr in lrs:
                cell = r.setdefault(method, {})
                cap = args.embedding_max_ratio if method == "perfusion" else None
                key = f"{lr:g}" + (f"@max{cap:g}" if cap else "")
                if key in cell:
                    continue
                t = time.perf_counter()
                if method == "perfusion":
                    c = bench.train_perfusion(name, "sweep", lr_embedding=lr, embedding_max_ratio=cap)
                    points = {f"{b:g}": score(name, c, gates={c.name: Gate(b, c.tensors.tau)}) for b in BIASES}
                else:
                    mcfg = recipe("ti", steps=bench.cfg.steps, batch_size=4, seed=bench.cfg.seed, lr=lr, lr_embedding=lr)
                    c = train_baseline(bench.base, WORD, tw.INSTANCES_BY_NAME[name].supercategory, bench.photos(name),
                                       mcfg)
                    points = {"final": score(name, c)}
                cell[key] = {"points": points, "embedding_norm": round(float(c.embeddings[0].norm()), 4),
                             "seconds": round(time.perf_counter() - t)}
                print(name, method, key, cell[key], flush=True)
                out.write_text(json.dumps(doc, indent=1))
    doc["choice"] = {}
    for method in ("perfusion", "ti"):
        measured = [n for n in res if res[n].get(method)]
        if not measured:
            continue
        lrs = set.intersection(*(set(res[n][method]) for n in measured))  # rates measured on every instance
        means = {lr: sum(p["alignment"] + p["fidelity"] for n in measured for p in res[n][method][lr]["points"].values())
                 / sum(len(res[n][method][lr]["points"]) for n in measured) for lr in lrs}
        doc["choice"][method] = {"instances": measured, "scores": {k: round(v, 4) for k, v in means.items()},
                                 "best": max(means, key=means.get)}
    out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["choice"], indent=1))


if __name__ == "__main__":
    main()
