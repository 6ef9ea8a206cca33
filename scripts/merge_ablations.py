"""Merge ablations reports into one, and write it as quality-ablations.{md,json,png}: runs of the same settings on
different instances (bench/ablations.merge: the ablations grow instance by instance, ~12 min each on 2 cores), or
runs of different ablations on the same instances (ablations.join_variants: an ablation added later joins).

    perfusion bench quality --parts ablations --instances scarfcat,golddog -o /tmp/more
    python scripts/merge_ablations.py docs/benchmarks/quality-ablations.json /tmp/more/quality-ablations.json \\
        -o docs/benchmarks
    perfusion bench quality --parts ablations --ablations word-scope --instances reporting -o /tmp/new
    python scripts/merge_ablations.py docs/benchmarks/quality-ablations.json /tmp/new/quality-ablations.json \\
        -o docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from perfusion_cli.bench.ablations import join_variants, merge
from perfusion_cli.bench.quality import write_reports


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path, help="quality-ablations.json files")
    ap.add_argument("-o", "--out", type=Path, required=True, help="folder for the merged report")
    args = ap.parse_args(argv)
    parts = []
    for path in args.reports:
        report = json.loads(path.read_text())
        parts.append(report)
    same_instances = all(set(r["results"]) == set(parts[0]["results"]) for r in parts)
    for path in write_reports((join_variants if same_instances else merge)(parts), args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
