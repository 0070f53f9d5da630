#!/usr/bin/env bash
# Train the built-in pixel and latent priors on one GPU in one time-boxed shot, export them as
# shipped folders and cut their weights into shards small enough to copy back.
#
#   scripts/train_builtin_gpu.sh DATA_DIR OUT_DIR [TRANSFER_DIR]
#
#   DATA_DIR      the prepared photographs (python -m diffstategrad.data build --out DATA_DIR)
#   OUT_DIR       runs/{pixel,autoencoder,latent}/  run folders (checkpoint.pt, run.json, loss.csv, train.log)
#                 export/pixel/, export/latent/     the shipped folders (config.json + model.safetensors)
#   TRANSFER_DIR  (default OUT_DIR/transfer) what to copy back, 7 files, each <= 15 MiB:
#                 {pixel,latent}.part{0,1}.safetensors   the weights, cut by split-shards
#                 {pixel,latent}.config.json              the folders' config.json
#                 logs.tar.gz                             run.json, loss.csv, train.log of each run + timings
#
# Put a folder back together on the other side (join_shards checks every tensor against the
# digest that the shards carry):
#   mkdir -p FOLDER && cp TRANSFER/pixel.config.json FOLDER/config.json
#   python -m diffstategrad.training join-shards FOLDER/model.safetensors TRANSFER/pixel.part*.safetensors
#   python -c "from diffstategrad.priors import load_prior; print(load_prior('converted', 'FOLDER'))"
#
# Timing. Each stage stops itself after its time box (--max-minutes, counted from the start of
# its trainer; about 10-20 s of start-up, export and sharding come on top of each). With
# PARALLEL=1 (the default) the pixel run trains beside the autoencoder -> latent chain on the same
# GPU, so the whole script takes about max(PIXEL, AE + LATENT) + 1 min = 6 min; PARALLEL=0 runs
# the three one after the other, about PIXEL + AE + LATENT + 1 min = 10 min, which does not fit a
# 10-minute device command with the default boxes (STAGES lets you split it over calls).
#
# Every variable below can be overridden from the environment, e.g. the CPU smoke test:
#   DEVICE=cpu WORKERS=0 PIXEL_MINUTES=0.3 AE_MINUTES=0.3 LATENT_MINUTES=0.3 PIXEL_BATCH=4 \
#     AE_BATCH=2 AE_CROP=64 LATENT_BATCH=2 LATENT_CROP=64 SCALE_IMAGES=8 \
#     scripts/train_builtin_gpu.sh data/photos /tmp/smoke
# Re-running with the same OUT_DIR resumes each run from its checkpoint (with a new time box).
set -euo pipefail

# -- time boxes (minutes) -------------------------------------------------------------------------
PIXEL_MINUTES=${PIXEL_MINUTES:-4}
AE_MINUTES=${AE_MINUTES:-2.5}
LATENT_MINUTES=${LATENT_MINUTES:-2.5}

# -- machine --------------------------------------------------------------------------------------
DEVICE=${DEVICE:-cuda}
PARALLEL=${PARALLEL:-1}           # 1: pixel beside autoencoder -> latent; 0: one after the other
WORKERS=${WORKERS:-12}            # crop-making processes per run (16 cores)
if [ "$PARALLEL" = 1 ]; then DEFAULT_WORKERS=$(( WORKERS > 1 ? WORKERS / 2 + 1 : WORKERS )); else DEFAULT_WORKERS=$WORKERS; fi
PIXEL_WORKERS=${PIXEL_WORKERS:-$DEFAULT_WORKERS}
AE_WORKERS=${AE_WORKERS:-$DEFAULT_WORKERS}
LATENT_WORKERS=${LATENT_WORKERS:-$DEFAULT_WORKERS}
PYTHON=${PYTHON:-python3}

# -- training settings ----------------------------------------------------------------------------
PIXEL_BATCH=${PIXEL_BATCH:-256};   PIXEL_CROP=${PIXEL_CROP:-64};    PIXEL_LR=${PIXEL_LR:-2e-4}
AE_BATCH=${AE_BATCH:-64};          AE_CROP=${AE_CROP:-128};         AE_LR=${AE_LR:-2e-4}
LATENT_BATCH=${LATENT_BATCH:-128}; LATENT_CROP=${LATENT_CROP:-128}; LATENT_LR=${LATENT_LR:-2e-4}
KL_WEIGHT=${KL_WEIGHT:-1e-6}
WARMUP=${WARMUP:-200}
STEPS=${STEPS:-1000000}           # a step budget that never binds: the time boxes do
SCALE_IMAGES=${SCALE_IMAGES:-512} # fixed training crops for the latent scale factor
LOG_EVERY=${LOG_EVERY:-100}
TINY=${TINY:-}                    # "--tiny" (tiny networks): smoke tests only
STAGES=${STAGES:-"pixel autoencoder latent export"}

if [ $# -lt 2 ]; then
  sed -n '2,32p' "$0"
  exit 2
fi
DATA=$(cd "$1" && pwd)
mkdir -p "$2"
OUT=$(cd "$2" && pwd)
TRANSFER=${3:-$OUT/transfer}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
TRAIN="$PYTHON -m diffstategrad.training"
mkdir -p "$OUT/runs" "$OUT/export" "$TRANSFER"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/timings.txt"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

# Pre-flight: the packages the trainer needs, and the device.
$PYTHON - "$DEVICE" <<'EOF'
import sys, torch, numpy, PIL, click, safetensors, yaml, tqdm  # noqa: F401
device = sys.argv[1]
print(f"torch {torch.__version__}, device {device}" + (f" ({torch.cuda.get_device_name(0)})" if device.startswith("cuda") and torch.cuda.is_available() else ""))
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("CUDA is not available here; set DEVICE=cpu for a smoke run")
EOF
df -h /dev/shm 2>/dev/null | tail -1 | awk '{print "shared memory for the crop workers: " $2 " (" $4 " free)"}' || true
# Crop workers hand batches over through /dev/shm; where it is small, make the crops in-process.
SHM_FREE_MB=$(df -Pm /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
if [ -n "$SHM_FREE_MB" ] && [ "$SHM_FREE_MB" -lt 2048 ] && [ "$PIXEL_WORKERS$AE_WORKERS$LATENT_WORKERS" != "000" ]; then
  echo "only ${SHM_FREE_MB} MB free in /dev/shm: crop workers off (--workers 0)"
  PIXEL_WORKERS=0; AE_WORKERS=0; LATENT_WORKERS=0
fi
stamp "start: stages '$STAGES', parallel $PARALLEL, boxes pixel $PIXEL_MINUTES / autoencoder $AE_MINUTES / latent $LATENT_MINUTES min"

common=(--device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" --log-every "$LOG_EVERY" --snapshot-every 0
        --checkpoint-minutes 1 --threads 1 $TINY)

train_pixel() {
  $TRAIN pixel --data "$DATA" --out "$OUT/runs/pixel" --crop "$PIXEL_CROP" --batch "$PIXEL_BATCH" --lr "$PIXEL_LR" \
    --workers "$PIXEL_WORKERS" --max-minutes "$PIXEL_MINUTES" "${common[@]}" 2>&1 | tee -a "$OUT/runs/pixel.log"
}
train_autoencoder() {
  $TRAIN autoencoder --data "$DATA" --out "$OUT/runs/autoencoder" --crop "$AE_CROP" --batch "$AE_BATCH" --lr "$AE_LR" \
    --kl-weight "$KL_WEIGHT" --workers "$AE_WORKERS" --max-minutes "$AE_MINUTES" "${common[@]}" 2>&1 | tee -a "$OUT/runs/autoencoder.log"
}
train_latent() {
  $TRAIN latent --data "$DATA" --out "$OUT/runs/latent" --autoencoder "$OUT/runs/autoencoder" --crop "$LATENT_CROP" \
    --batch "$LATENT_BATCH" --lr "$LATENT_LR" --scale-images "$SCALE_IMAGES" --workers "$LATENT_WORKERS" \
    --max-minutes "$LATENT_MINUTES" "${common[@]}" 2>&1 | tee -a "$OUT/runs/latent.log"
}

# A failed stage does not stop the others (the latent run needs the autoencoder's, though);
# the script exits non-zero at the end if any failed.
failed=""
run_stage() { if "train_$1"; then stamp "$1: done"; else stamp "$1: FAILED"; failed="$failed $1"; fi; }
pixel_pid=""
if has pixel; then
  if [ "$PARALLEL" = 1 ]; then
    stamp "pixel: started in the background"
    train_pixel > /dev/null &
    pixel_pid=$!
  else
    run_stage pixel
  fi
fi
has autoencoder && run_stage autoencoder
has latent && run_stage latent
if [ -n "$pixel_pid" ]; then
  if wait "$pixel_pid"; then stamp "pixel: done"; else stamp "pixel: FAILED"; failed="$failed pixel"; fi
fi

if has export; then
  for name in pixel latent; do
    [ -f "$OUT/runs/$name/checkpoint.pt" ] || { stamp "export: no $name run, skipped"; continue; }
    if $TRAIN export-builtin "$OUT/runs/$name" --out "$OUT/export/$name" --name "$name" --overwrite &&
       $TRAIN split-shards "$OUT/export/$name/model.safetensors" --prefix "$TRANSFER/$name" --max-mib 15; then
      cp "$OUT/export/$name/config.json" "$TRANSFER/$name.config.json"
    else
      stamp "export $name: FAILED"; failed="$failed export-$name"
    fi
  done
  # Check the way back: join the shards, load both priors, run them on the device.
  $PYTHON - "$OUT" "$TRANSFER" "$DEVICE" <<'EOF' || { stamp "check: FAILED"; failed="$failed check"; }
import glob, os, shutil, sys, tempfile, torch
from diffstategrad.priors import load_prior
from diffstategrad.training import join_shards
out, transfer, device = sys.argv[1:4]
for name in ("pixel", "latent"):
    parts = sorted(glob.glob(os.path.join(transfer, f"{name}.part*.safetensors")))
    if not parts:
        continue
    folder = tempfile.mkdtemp()
    shutil.copy(os.path.join(transfer, f"{name}.config.json"), os.path.join(folder, "config.json"))
    join_shards(parts, os.path.join(folder, "model.safetensors"))
    prior = load_prior("converted", folder).to(device)
    x = torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad():
        state = prior.encode(x) if prior.kind == "latent" else x
        eps = prior.eps(state, torch.tensor([10, 500], device=device))
        image = prior.decode(state) if prior.kind == "latent" else state
    assert torch.isfinite(eps).all() and image.shape == x.shape
    info = prior.info
    print(f"check {name}: {len(parts)} shards rejoined and loaded; {info['parameters']:,} parameters, "
          f"{info['steps']} steps, {info['images_seen']} images, {info['wall_time_s']} s, state {tuple(state.shape)}")
    shutil.rmtree(folder)
EOF
  stamp "export: done"
fi

# Logs and timings travel as one small archive (the transfer channel takes few files).
stamp "finished; transfer folder: $TRANSFER${failed:+; FAILED:$failed}"
( cd "$OUT" && tar czf "$TRANSFER/logs.tar.gz" timings.txt $(ls runs/*.log runs/*/run.json runs/*/loss.csv 2>/dev/null) )
ls -la "$TRANSFER"
[ -z "$failed" ]
