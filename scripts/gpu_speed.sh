#!/usr/bin/env bash
# The GPU speed benchmark in one shot (about 5 minutes on one H100 / H200; budget 10):
# benchmarks/speed.py --gpu, i.e. at 256x256
#   - the projector's basis per SVD back-end, on the device and on the host (svd part),
#   - DPS on the guided-diffusion FFHQ-256 architecture (93.6M parameters, random weights in the
#     real layout): ms per step, the network's share, DiffStateGrad's overhead per back-end and
#     placement (auto = host, overlapped with the network pass),
#   - the precision paths (fp32, channels-last, tf32, bf16, fp16) on that network and on the
#     trained built-in pixel prior (speed-up and PSNR change),
#   - ReSample on the LDM-VQ-4 architecture (random weights in the real layout).
#
#   scripts/gpu_speed.sh [OUT_DIR]            # default: $OUT when set (the device tool), else runs/gpu_speed
#
# Writes OUT_DIR/gpu_speed.md (the tables docs/performance.md includes), OUT_DIR/gpu_speed.json
# (raw medians) and OUT_DIR/gpu_speed.log. Variables: PYTHON (default python3), REPEATS (3),
# DPS_STEPS (50), RESAMPLE_STEPS (50), PRECISION_STEPS (20), EXTRA (more speed.py flags, e.g.
# "--compile", which adds a few minutes of compilation).
# Dry run on a CPU (tiny sizes, numbers mean nothing):
#   DEVICE=cpu EXTRA=--tiny scripts/gpu_speed.sh /tmp/gpu_dry
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:-${OUT:-runs/gpu_speed}}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
REPEATS=${REPEATS:-3}
DPS_STEPS=${DPS_STEPS:-50}
RESAMPLE_STEPS=${RESAMPLE_STEPS:-50}
PRECISION_STEPS=${PRECISION_STEPS:-20}
EXTRA=${EXTRA:-}
mkdir -p "$OUT_DIR"

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  echo "== $(date -u +%FT%TZ) gpu_speed on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "(no nvidia-smi)"
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} 2>&1 | tee "$OUT_DIR/gpu_speed.log"

set -o pipefail
# shellcheck disable=SC2086
"$PYTHON" benchmarks/speed.py --gpu --device "$DEVICE" --repeats "$REPEATS" --gpu-dps-steps "$DPS_STEPS" \
  --gpu-resample-steps "$RESAMPLE_STEPS" --precision-steps "$PRECISION_STEPS" \
  --out "$OUT_DIR/gpu_speed.md" --json "$OUT_DIR/gpu_speed.json" $EXTRA 2>&1 | tee -a "$OUT_DIR/gpu_speed.log"
