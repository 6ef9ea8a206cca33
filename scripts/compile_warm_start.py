"""What `perfusion train --compile` spends compiling in a fresh process, when torch's on-disk caches are warm
(a second run on the same machine, e.g. after `perfusion bench speed --compile` or an earlier training).

    python scripts/compile_warm_start.py --scale sd15 --device cuda [--mode default] [--steps 4]

Prints one JSON line: the first step's time (set-up + compile or cache load + one step) and the later steps'.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

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
    ap.add_argument("--bf16", action="store_true", help="weights in bf16 and no autocast (scripts/precision_probe.py)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    dev = models.pick_device(args.device)
    cfg = SpeedConfig(scale=args.scale, device=dev.type).resolved(dev)
    base = _load(cfg.scale, dev.type, cfg.dtype, cfg.seed)
    C, _ = _covariance(base)
    if args.bf16:
        base = models.with_dtype(base, torch.bfloat16)
    sync = _sync(dev)
    batch = args.batch or cfg.train_batch
    tcfg = TrainConfig(steps=args.steps, batch_size=batch, grad_accum=1, checkpoint_every=0, mask="none",
                       compile=True, compile_mode=args.mode)
    stamps: list[float] = []

    def on_step(_):
        sync()
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    trainer = Trainer(base, TRAIN_NAME, TRAIN_SUPER, inverse_covariance(C), tcfg)
    if args.bf16:
        trainer.autocast = {**trainer.autocast, "enabled": False}
    concept = trainer.fit(_photos(base, cfg), progress=on_step)
    t_end = time.perf_counter()
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    print(json.dumps({"scale": args.scale, "device": dev.type, "mode": trainer.compile_mode, "bf16": args.bf16,
                      "batch": batch, "model_s": t0 - t_start, "first_step_s": stamps[0] - t0,
                      "fit_s": t_end - t0, "later_steps_total_s": sum(steps),
                      "later_step_median_s": statistics.median(steps) if steps else None,
                      "final_loss": concept.training.get("final_loss"), "later_steps_s": steps}))


if __name__ == "__main__":
    main()
