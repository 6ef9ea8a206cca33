"""Training time and file size of every method on one toy instance, measured one after another in one process on
an otherwise idle machine (the `bench quality` reports' training column comes from runs that shared the machine or
were carried over from other sessions: read it as a ranking; this is the clean measurement).

Each method trains the instance's concept exactly as `perfusion bench quality` does (400 steps, 6 photos, batch 4;
DreamBooth's time includes rendering its class images), `--repeats` times in rotated order; the median is reported.

    python scripts/train_times.py                           # hatcat, 1 repeat: ~10 min on 2 CPU cores
    python scripts/train_times.py --repeats 2 --out /tmp/times.json

Writes docs/benchmarks/train-times-toy-cpu.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instance", default="hatcat")
    ap.add_argument("--methods", default="perfusion,ti,dreambooth,lora,custom-diffusion")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", type=int, default=400, help="training steps (the benchmark's 400; fewer: a smoke run)")
    ap.add_argument("--out", default="docs/benchmarks/train-times-toy-cpu.json")
    args = ap.parse_args()

    import torch

    from perfusion_cli import __version__
    from perfusion_cli import concept as concept_io
    from perfusion_cli.bench.quality import Bench, QualityConfig
    from perfusion_cli.concept import ConceptSet

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bench = Bench(QualityConfig(instances=(args.instance,), methods=tuple(methods), parts=("methods",),
                                steps=args.steps),
                  progress=lambda *a: None, say=lambda m: None)
    bench.photos(args.instance)   # photos are written and read once, outside the timed region
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    sizes: dict[str, int] = {}
    for r in range(args.repeats):
        for m in methods[r % len(methods):] + methods[:r % len(methods)]:   # rotated: no method always first
            bench.concepts.pop((args.instance, m), None)
            bench.concept(args.instance, m)
            seconds[m].append(bench.train_seconds[(args.instance, m)])
            c = bench.concepts[(args.instance, m)]
            cs = ConceptSet(name=c.name, concepts=[c], base_model={"id": bench.base.id}, covariance=bench.cov.info)
            sizes[m] = len(concept_io.to_bytes(cs))
            bench.release(args.instance, m)
            bench.concepts.pop((args.instance, m), None)
            print(f"{m}: {seconds[m][-1]:.1f} s", flush=True)
    doc = {
        "what": __doc__.splitlines()[0],
        "command": f"python scripts/train_times.py --instance {args.instance} --methods {args.methods} "
                   f"--repeats {args.repeats} --steps {args.steps}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "perfusion": __version__},
        "instance": args.instance, "steps": bench.cfg.steps, "photos": bench.cfg.photos,
        "seconds": {m: [round(s, 1) for s in v] for m, v in seconds.items()},
        "median_seconds": {m: round(statistics.median(v), 1) for m, v in seconds.items()},
        "file_bytes": sizes,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print("| method | training (median of %d) | file (fp16) |\n| --- | ---: | ---: |" % args.repeats)
    for m in methods:
        print(f"| {m} | {doc['median_seconds'][m]:.0f} s | {sizes[m] / 1024:.1f} KB |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
