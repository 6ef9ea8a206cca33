"""Which precision makes a training step fastest? The floor step (frozen UNet + text encoder, forward and backward
to the input embeddings) and `perfusion train`'s step, eager, in three set-ups, interleaved in rounds:

  fp16+autocast  weights fp16, bf16 autocast (what `perfusion train` does with a GPU pipeline today)
  bf16+autocast  weights bf16, bf16 autocast (no weight casts; autocast still runs norms and softmax in fp32)
  bf16           weights bf16, no autocast (every op in bf16; the trainable tensors stay fp32)

    python scripts/precision_probe.py --scale sd15 --device cuda [--rounds 3 --steps 5 --warmup 2] [--out DIR]

A probe for a decision (PERFUSION.md §12 measured a 136.6 ms floor where `bench speed` measures 153-171 ms with
fp16 weights under bf16 autocast), not a benchmark report: prints one JSON line per round and variant, then a
summary line; with --out, also appends them to DIR/precision-probe.jsonl as they come (a killed run keeps them).
Random weights at sd15 scale: timings only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from perfusion_cli import models
from perfusion_cli.bench.speed import TRAIN_NAME, TRAIN_SUPER, SpeedConfig, _covariance, _load, _photos, _sync, floor_step
from perfusion_cli.edit import inverse_covariance
from perfusion_cli.text import rewrite
from perfusion_cli.training import Trainer, TrainConfig

VARIANTS = {  # name: (weight dtype, autocast on)
    "fp16+autocast": (torch.float16, True),
    "bf16+autocast": (torch.bfloat16, True),
    "bf16": (torch.bfloat16, False),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", default="toy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = models.pick_device(args.device)
    cfg = SpeedConfig(scale=args.scale, device=dev.type).resolved(dev)
    base = _load(cfg.scale, dev.type, cfg.dtype, cfg.seed)
    C_inv = inverse_covariance(_covariance(base)[0])
    photos = _photos(base, cfg)
    sync = _sync(dev)
    batch = args.batch or cfg.train_batch
    sink = Path(args.out) / "precision-probe.jsonl" if args.out else None
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    prompts = [rewrite(p, {TRAIN_NAME: TRAIN_SUPER})   # the trainer's own prompts, the concept word replaced
               for p in Trainer(base, TRAIN_NAME, TRAIN_SUPER, C_inv, TrainConfig()).prompts]

    def emit(rec: dict) -> None:
        line = json.dumps(rec)
        print(line, flush=True)
        if sink:
            with sink.open("a") as f:
                f.write(line + "\n")

    def peak_reset():
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak():
        return torch.cuda.max_memory_allocated() if dev.type == "cuda" else None

    emit({"scale": args.scale, "device": dev.type, "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
          "torch": torch.__version__, "batch": batch, "rounds": args.rounds, "steps": args.steps})
    times: dict[str, dict[str, list[float]]] = {n: {"floor": [], "train": []} for n in names}
    for r in range(args.rounds):
        for name in names:
            dtype, autocast_on = VARIANTS[name]
            base = models.with_dtype(base, dtype)
            rec = {"round": r, "variant": name}
            # perfusion train's step, its autocast switched as the variant says
            try:
                tcfg = TrainConfig(steps=1 + args.warmup + args.steps, batch_size=batch, grad_accum=1,
                                   checkpoint_every=0, mask="none", seed=cfg.seed)
                trainer = Trainer(base, TRAIN_NAME, TRAIN_SUPER, C_inv, tcfg)
                trainer.autocast = {**trainer.autocast, "enabled": autocast_on and dev.type == "cuda"}
                stamps: list[float] = []

                def on_step(p):
                    sync()
                    stamps.append(time.perf_counter())
                    if p.step == 1 + args.warmup:
                        peak_reset()

                concept = trainer.fit(photos, progress=on_step)
                steps = [y - x for x, y in zip(stamps, stamps[1:])][args.warmup:]
                times[name]["train"] += steps
                rec.update(train_ms=round(1e3 * statistics.median(steps), 2), train_peak=peak(),
                           final_loss=concept.training.get("final_loss"))
            except Exception as e:  # a variant the trainer cannot run: say so, keep the others
                rec["train_error"] = f"{type(e).__name__}: {e}"[:300]
            try:
                ac = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast_on and dev.type == "cuda")
                floor = floor_step(base, prompts, batch, ac, cfg.seed)
                fl = []
                for k in range(1 + args.warmup + args.steps):
                    if k == 1 + args.warmup:
                        peak_reset()
                    t = time.perf_counter()
                    floor()
                    sync()
                    if k > args.warmup:
                        fl.append(time.perf_counter() - t)
                times[name]["floor"] += fl
                rec.update(floor_ms=round(1e3 * statistics.median(fl), 2), floor_peak=peak())
            except Exception as e:
                rec["floor_error"] = f"{type(e).__name__}: {e}"[:300]
            emit(rec)
    summary = {n: {k: round(1e3 * statistics.median(v), 2) if v else None for k, v in t.items()}
               for n, t in times.items()}
    emit({"summary_median_ms": summary})


if __name__ == "__main__":
    main()
