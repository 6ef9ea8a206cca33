"""What `perfusion train --compile` spends compiling in a fresh process, when torch's on-disk caches are warm
(a second run on the same machine, e.g. after `perfusion bench speed --compile` or an earlier training).

    python scripts/compile_warm_start.py --scale sd15 --device cuda [--mode default] [--steps 4]

Prints one JSON line: the first step's time (set-up + compile or cache load + one step) and the later steps'.
"""

from __future__ import annotations

import argparse
import json
import time

from perfusion_cli import models
from perfusion_cli.bench.speed import TRAIN_NAME, TRAIN_SUPER, SpeedConfig, _covariance, _load, _photos, _sync
from perfusion_cli.edit import inverse_covariance
from perfusion_cli.training import Trainer, TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", default="toy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--mode", default="default")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=None)
    args = ap.parse_args()
    t_start = time.perf_counter()
    dev = models.pick_device(args.device)
    cfg = SpeedConfig(scale=args.scale, device=dev.type).resolved(dev)
    base = _load(cfg.scale, dev.type, cfg.dtype, cfg.seed)
    C, _ = _covariance(base)
    sync = _sync(dev)
    batch = args.batch or cfg.train_batch
    tcfg = TrainConfig(steps=args.steps, batch_size=batch, grad_accum=1, checkpoint_every=0, mask="none",
                       compile=True, compile_mode=args.mode)
    stamps: list[float] = []

    def on_step(_):
        sync()
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    Trainer(base, TRAIN_NAME, TRAIN_SUPER, inverse_covariance(C), tcfg).fit(_photos(base, cfg), progress=on_step)
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    print(json.dumps({"scale": args.scale, "device": dev.type, "mode": args.mode, "batch": batch,
                      "model_s": t0 - t_start, "first_step_s": stamps[0] - t0, "later_steps_s": steps}))


if __name__ == "__main__":
    main()
