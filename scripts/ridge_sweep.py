"""Is the toy covariance's near-singularity what costs Perfusion its fidelity on the toy world? On DEVELOPMENT
instances, train and render one Perfusion concept per ridge of `edit.inverse_covariance` (the ridge is added to C
before inverting, as a fraction of C's mean variance), and record both the benchmark's points and the gate itself.

The toy C is estimated from captions of a few dozen words (eigenvalues 3e-8 … 210): in the C⁻¹ metric a concept's
encoding is compared mostly along directions the captions never vary in, so the similarity s(e) = eᵀC⁻¹i*/E at the
concept's own token can fall well below 1 when its context changes, and the gate σ((s − β)/τ) closes on the concept
itself (the ablations found plain ROME, which uses s unsquashed, more faithful than the gate at β 0.7). A larger
ridge is a shrinkage estimate of C: it weighs those directions less. The SD 1.x matrix is well conditioned (its
ridge of 1e-4 adds 0.2% of its smallest eigenvalue), so this concerns small-vocabulary models like the toy one.

Per instance and ridge: the points at gate biases 0.5, 0.7, 0.9 (the benchmark's 8 prompts × 2 seeds), and over
those prompts, s at the concept's token (the highest s of the prompt), the next highest s, and the share of the
prompt's other tokens whose gate opens past 0.5 at β 0.7.

    python scripts/ridge_sweep.py                          # tealcat, patchcat, blazedog; ridges 1e-4 … 1e-1
    python scripts/ridge_sweep.py --instances tealcat --ridges 1e-4,1e-2 --out /tmp/ridge.json

Writes docs/benchmarks/ridge-dev-sweep.json (resumable: finished cells are kept).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)
BIASES = (0.5, 0.7, 0.9)


def gate_stats(bench, concept, C_inv, beta: float = 0.7) -> dict:
    """s(e) over the benchmark's prompts with the concept: at its token (each prompt's highest s), the runner-up,
    and the share of the other tokens up to the prompt's end whose gate at β opens past 0.5."""
    import torch

    from perfusion_cli.edit import gate, similarity_direction
    from perfusion_cli.rendering import Applied
    from perfusion_cli.text import encode
    from perfusion_cli.bench.quality import WORD

    prompts = [p.format(WORD) for p in bench.cfg.prompts]
    with Applied(bench.base.pipe, [concept], bench.cov.C, C_inv=C_inv) as ap, torch.no_grad():
        e = encode(bench.base.pipe, ap.prepare(prompts)).embeds.double()          # (B, L, d)
    u = similarity_direction(concept.tensors.i_star.double().reshape(-1), C_inv.double())
    s = e @ u                                                                      # (B, L)
    tok = bench.base.pipe.tokenizer
    lengths = [len(tok(p.replace(WORD, concept.supercategory)).input_ids) for p in prompts]  # BOS … EOS
    top, second, open_share = [], [], []
    for row, n in zip(s, lengths):
        row = row[:n]
        vals, idx = row.sort(descending=True)
        top.append(float(vals[0]))
        second.append(float(vals[1]))
        others = torch.cat([row[: idx[0]], row[idx[0] + 1:]])
        open_share.append(float((gate(others, beta, concept.tensors.tau) > 0.5).double().mean()))
    mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
    return {"s_concept_mean": mean(top), "s_concept_min": round(min(top), 4), "s_next_mean": mean(second),
            "other_tokens_open_at_0.7": mean(open_share),
            "gate_at_concept_0.7": mean([float(gate(torch.tensor(x), beta, concept.tensors.tau)) for x in top])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", default="tealcat,patchcat,blazedog")
    ap.add_argument("--ridges", default=",".join(f"{x:g}" for x in RIDGES))
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the benchmark's, 400)")
    ap.add_argument("--out", default="docs/benchmarks/ridge-dev-sweep.json")
    args = ap.parse_args()

    from perfusion_cli.bench.quality import Bench, development_config
    from perfusion_cli.edit import inverse_covariance
    from perfusion_cli.errors import PerfusionError
    from perfusion_cli.rendering import Gate

    try:
        qc = development_config(args.instances, steps=args.steps)
    except PerfusionError as e:
        raise SystemExit(f"error: {e}")
    names = list(qc.instances)
    bench = Bench(qc, progress=lambda *a: None, say=print)
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc.update({"what": __doc__.splitlines()[0], "prompts": list(bench.cfg.prompts), "seeds": bench.cfg.seeds,
                "steps": bench.cfg.steps, "biases": list(BIASES),
                "command": "python scripts/ridge_sweep.py " + " ".join(
                    f"--{k} {v}" for k, v in (("instances", args.instances), ("ridges", args.ridges),
                                                ("steps", args.steps)) if v is not None)})
    res = doc.setdefault("results", {})
    for name in names:
        r = res.setdefault(name, {})
        if "base model" not in r:
            bp = bench.base_point(name)
            r["base model"] = {"alignment": round(bp["alignment"], 4), "fidelity": round(bp["fidelity"], 4)}
        for ridge in (float(x) for x in args.ridges.split(",") if x.strip()):
            key = f"{ridge:g}"
            if key in r:
                continue
            t = time.perf_counter()
            C_inv = inverse_covariance(bench.cov.C, ridge=ridge)
            bench.C_inv = C_inv                       # what train_perfusion hands the Trainer
            c = bench.train_perfusion(name, f"ridge {key}")
            points = {}
            for b in BIASES:
                pt = bench.point(name, [c], {"gates": {c.name: Gate(b, c.tensors.tau)}, "C_inv": C_inv})
                points[f"{b:g}"] = {"alignment": round(pt["alignment"], 4), "fidelity": round(pt["fidelity"], 4)}
            r[key] = {"points": points, "gate": gate_stats(bench, c, C_inv), "seconds": round(time.perf_counter() - t)}
            print(name, key, json.dumps(r[key]), flush=True)
            out.write_text(json.dumps(doc, indent=1))
    summary = {}
    for key in {k for r in res.values() for k in r if k != "base model"}:
        cells = [r[key] for r in res.values() if key in r]
        pts = [p for c in cells for p in c["points"].values()]
        summary[key] = {"instances": len(cells),
                        "alignment": round(sum(p["alignment"] for p in pts) / len(pts), 4),
                        "fidelity": round(sum(p["fidelity"] for p in pts) / len(pts), 4),
                        "s_concept_mean": round(sum(c["gate"]["s_concept_mean"] for c in cells) / len(cells), 4),
                        "gate_at_concept_0.7": round(sum(c["gate"]["gate_at_concept_0.7"] for c in cells) / len(cells), 4)}
    doc["summary"] = dict(sorted(summary.items(), key=lambda kv: float(kv[0])))
    out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["summary"], indent=1))


if __name__ == "__main__":
    main()
