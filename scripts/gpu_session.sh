#!/usr/bin/env bash
# One prepared GPU session (the way docs/benchmarks and the toyworld model were produced):
#   1. a CUDA smoke test of `perfusion toyworld train-base` (a few steps, every code path);
#   2. `perfusion bench speed --scale sd15` (SD 1.5 architecture, random weights);
#   3. `perfusion toyworld train-base` for real, its time budget what is left of the session.
# Outputs land in $OUT (default ./out): run.log, speed-sd15-*.md/.json, $MODEL_NAME.tar.part-* (the model
# folder, split in 15 MiB pieces: `cat toyworld-v2.tar.part-* | tar x`).
#
# On a machine without diffusers / platformdirs, put their wheels in .whl/ (see docs/benchmarks/README.md).
# Knobs (environment): DEVICE (cuda), SESSION_S (seconds the whole script may take, 570), TRAIN_MAX_MIN (4.5),
# BENCH_ARGS (extra `bench speed` arguments), BENCH_TIMEOUT (260), SMOKE_ONLY=1 (stop after the smoke test),
# SKIP_SMOKE=1 (no smoke test: the recipe was already run on CUDA), SKIP_BENCH=1, SKIP_TRAIN=1 (no train-base),
# WARM_START=MODE (after the bench: scripts/compile_warm_start.py, the compile of `train --compile` in a fresh
# process with torch's caches warm), MODEL_NAME (toyworld-v2), TRAIN_ARGS, PY (python3).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
DEVICE=${DEVICE:-cuda}
SESSION_S=${SESSION_S:-570}
TRAIN_MAX_MIN=${TRAIN_MAX_MIN:-4.5}
MODEL_NAME=${MODEL_NAME:-toyworld-v2}
PY=${PY:-python3}
mkdir -p "$OUT"
LOG="$OUT/run.log"
exec > >(tee -a "$LOG") 2>&1
stamp() { echo "=== $(date -u +%H:%M:%S) [${SECONDS}s] $*"; }

stamp "start"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PERFUSION_HOME=${PERFUSION_HOME:-/tmp/perfusion-home}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY - <<'PYEOF'
import os, torch, diffusers, transformers, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "diffusers", diffusers.__version__, "transformers", transformers.__version__, "cpus", os.cpu_count())
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PYEOF
$PY - <<'PYEOF'
import os, shutil, sysconfig
try:
    import triton
    tv = triton.__version__
except Exception as e:  # torch.compile on CUDA needs triton and a C compiler with Python's headers
    tv = f"missing ({e})"
print("triton", tv, "| cc", shutil.which("cc") or shutil.which("gcc"),
      "| Python.h", os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
PYEOF
CLI="$PY -m perfusion_cli --debug"

if [ "${SKIP_SMOKE:-0}" = 1 ]; then
  SMOKE_OK=1; stamp "1. smoke test skipped (SKIP_SMOKE=1)"
else
stamp "1. smoke test: train-base on $DEVICE, a few steps"
SMOKE=(--set vae_steps=3 --set joint_steps=3 --set eval_images=16 --set leak_captions=64 --set sample_prompts=2
       --set sample_steps=2 --set vae_eval_points=1 --set data_workers=2 --set checkpoint_minutes=0)
rm -rf /tmp/tw-smoke
if timeout 150 $CLI toyworld train-base --out /tmp/tw-smoke --minutes 2 --device "$DEVICE" --preset gpu "${SMOKE[@]}" \
     --json > /tmp/tw-smoke.json; then
  SMOKE_OK=1; stamp "smoke test passed"
else
  SMOKE_OK=0; stamp "SMOKE TEST FAILED (the real base-model run is skipped)"
fi
fi
[ "${SMOKE_ONLY:-0}" = 1 ] && exit $((1 - SMOKE_OK))

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  stamp "2. bench speed --scale ${BENCH_SCALE:-sd15} on $DEVICE"
  timeout "${BENCH_TIMEOUT:-260}" $CLI bench speed --scale "${BENCH_SCALE:-sd15}" --device "$DEVICE" -o "$OUT" \
    ${BENCH_ARGS:-} || stamp "BENCH FAILED"
fi
if [ -n "${WARM_START:-}" ] && [ $((SESSION_S - SECONDS)) -gt 100 ]; then
  stamp "2b. compile_warm_start.py --mode $WARM_START (a fresh process, torch's caches warm)"
  timeout $((SESSION_S - SECONDS - 5)) $PY scripts/compile_warm_start.py --scale "${BENCH_SCALE:-sd15}" \
    --device "$DEVICE" --mode "$WARM_START" | tee "$OUT/compile-warm-start.json" || stamp "WARM START FAILED"
fi
[ "${SKIP_TRAIN:-0}" = 1 ] && { stamp "end (SKIP_TRAIN=1)"; exit 0; }

if [ "$SMOKE_OK" = 1 ]; then
  # the training budget: what is left, less ~100 s for start-up, saving, evaluation, samples and packing
  LEFT=$((SESSION_S - SECONDS - 100))
  MIN=$($PY -c "print(round(max(0.5, min($TRAIN_MAX_MIN, $LEFT / 60)), 2))")
  stamp "3. train-base for $MIN minutes on $DEVICE"
  rm -rf "/tmp/$MODEL_NAME"
  if timeout $((SESSION_S - SECONDS - 5)) $CLI toyworld train-base --out "/tmp/$MODEL_NAME" --minutes "$MIN" \
       --device "$DEVICE" --preset gpu ${TRAIN_ARGS:-} --json > "$OUT/$MODEL_NAME-report.json"; then
    stamp "train-base done"
  else
    stamp "TRAIN-BASE FAILED"
  fi
  if [ -d "/tmp/$MODEL_NAME" ]; then
    rm -rf "/tmp/$MODEL_NAME/.checkpoint"
    tar -C /tmp -cf - "$MODEL_NAME" | split -b 15M - "$OUT/$MODEL_NAME.tar.part-"
    ls -la "$OUT"
  fi
fi
stamp "end"
