"""Merge ablations reports of the same settings run on different instances into one (bench/ablations.merge), and
write it as quality-ablations.{md,json,png}: lets the ablations grow instance by instance, ~12 min each on 2 cores.

    perfusion bench quality --parts ablations --instances scarfcat,golddog -o /tmp/more
    python scripts/merge_ablations.py docs/benchmarks/quality-ablations.json /tmp/more/quality-ablations.json \\
        -o docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from perfusion_cli.bench.ablations import merge
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
    for path in write_reports(merge(parts), args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
