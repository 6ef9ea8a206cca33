"""Rewrite `bench quality` reports (Markdown, JSON, PNG) from their JSON, with the current report code: a methods
report gets its derived fields (mean curves, claim checks) recomputed from its per-instance results, so a check
added after the benchmark ran (e.g. `claim_with_noise`) reaches the committed report without rerunning it.

    python scripts/rewrite_reports.py docs/benchmarks/quality.json -o docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from perfusion_cli.bench.quality import METHOD_ORDER, derived, write_reports


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path, help="quality*.json files")
    ap.add_argument("-o", "--out", type=Path, required=True, help="folder for the rewritten reports")
    args = ap.parse_args(argv)
    for path in args.reports:
        report = json.loads(path.read_text())
        if report.get("part", "methods") == "methods":
            methods = [m for m in METHOD_ORDER if m in report["mean"]]
            report.update(derived(report["results"], methods))
        for written in write_reports(report, args.out):
            print(written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
