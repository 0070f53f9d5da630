#!/usr/bin/env bash
# The robustness study on the built-in Fashion-MNIST prior (docs/claims.md).
#
#   bash scripts/fashion_study.sh            # the full study of issue 11 (see its cost below)
#   bash scripts/fashion_study.sh quick      # the reduced study reported in docs/claims.md
#   WORKERS=2 OUT=runs bash scripts/fashion_study.sh quick
#
# Needs Debian's dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist) or
# DIFFSTATEGRAD_FASHION_MNIST pointing at the IDX files. Both runs are `diffstategrad evaluate`
# runs: interrupted, they resume where they stopped when the same command is run again.
# Held-out images only: the first N of the 10,000 test images (the model never saw them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs}
WORKERS=${WORKERS:-2}
mode=${1:-full}
common=(--model fashion --workers "$WORKERS" --threads 1 --lpips none --quiet)
if [[ $mode == quick ]]; then
  # the reduced study of docs/claims.md: 200 images, 1 seed, 2 tasks (box inpainting, 4x super-resolution), DPS and DiffPIR at 50 steps
  # + TV, multipliers x0.3-x10 (80 CPU-minutes: about 40 min on 2 cores); the noise run: DPS + TV
  images=fashion-test:200; seeds=0; steps=50; solvers=tv,dps,diffpir; mults=0.3,1,3,10
  tasks=box_inpainting,super_resolution
else
  # what issue 11 asks: 200 images, 2 seeds, 5 tasks, every pixel solver, x0.3-x30: 20,000 items
  # per solver; at the quick run's 1.0 s (DPS) and 0.47 s (DiffPIR) per image and an assumed 1.5 s
  # for DAPS, about 8 h on 2 cores (see docs/claims.md)
  images=fashion-test:200; seeds=0,1; steps=50; solvers=tv,dps,daps,diffpir; mults=0.3,1,3,10,30
  tasks=box_inpainting,super_resolution,gaussian_deblur,motion_deblur,phase_retrieval
fi
$PY -m diffstategrad.cli evaluate --images "$images" --tasks "$tasks" --solvers "$solvers" --batch 25 \
  --guidance-multipliers "$mults" --seeds "$seeds" --steps "$steps" "${common[@]}" --out "$OUT/fashion-study-$mode" || [[ $? == 3 ]]
# the second noise level, on box inpainting (the presets' sigma is 0.05)
if [[ $mode == quick ]]; then solvers=tv,dps; fi
$PY -m diffstategrad.cli evaluate --images "$images" --tasks box_inpainting --task-option noise.sigma=0.2 --solvers "$solvers" --batch 25 \
  --guidance-multipliers "$mults" --seeds "$seeds" --steps "$steps" "${common[@]}" --out "$OUT/fashion-noise0.2-$mode" || [[ $? == 3 ]]
