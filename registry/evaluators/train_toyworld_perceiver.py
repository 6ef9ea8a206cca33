"""Train the toy-world evaluators' perceiver and write toyworld-perceiver.safetensors next to this file.

    python registry/evaluators/train_toyworld_perceiver.py [--dense-steps N] [--crop-steps N] [--n-train N]
        [--seed S] [--out PATH]

Deterministic for a given seed, torch version and thread count (CPU; one thread by default, as the shipped
weights were trained): about 13 minutes.
See perfusion_cli/toyworld/evaluate.py (train_perceiver) and docs/toyworld-evaluators.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from perfusion_cli.toyworld import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense-steps", type=int, default=None, help="dense-network steps (default: train_perceiver's)")
    ap.add_argument("--crop-steps", type=int, default=None, help="crop-network steps (default: train_perceiver's)")
    ap.add_argument("--n-train", type=int, default=None, help="training renders (default: train_perceiver's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the shipped weights: 1)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / evaluate.WEIGHTS_NAME)
    args = ap.parse_args()
    kw = {"seed": args.seed}
    for name in ("dense_steps", "crop_steps", "n_train"):
        if getattr(args, name):
            kw[name] = getattr(args, name)
    import torch

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    state, meta = evaluate.train_perceiver(**kw)
    path = evaluate.save_weights(state, meta, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB) in {time.perf_counter() - t:.1f} s: {meta}")


if __name__ == "__main__":
    main()
