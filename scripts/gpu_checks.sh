#!/usr/bin/env bash
# The GPU checks of issues 14 and 15, one per device call (each fits the device tool's 10-minute call limit; a
# session has 15 device-minutes in all, so the art check takes one session and `mfu` + `nfe` another). Build the
# kit first here (bash scripts/gpu_kit.sh [DDPM_CKPT]), then through the device tool's run, in the repository root:
#   mfu  (carry .devkit/whl .devkit/mnist): model=ddpm defaults (the CIFAR-size UNet, 64/128/256, attention at 8 px)
#        on MNIST at 32 px, bf16-mixed, batch 128, 5 minutes; PerfSummary's images/s, peak memory, FLOPs/image, MFU
#   nfe  (carry .devkit/whl .devkit/mnist .devkit/ckpt): scripts/fid_vs_nfe.py on .devkit/ckpt/ddpm.ckpt with the
#        DDPM-1000 row beside DPM-Solver++ 2M SDE and UniPC at 25 and 50 NFE, 5,000 samples each
#   art  (carry .devkit/whl .devkit/art): experiment=ddpm_art_gpu for 7.5 minutes, then evaluate.py at 64 and 32 px
#        (2,000 samples, art features); the grid comes back
#   smoke (here, on a CPU, with the project's venv): every check at toy size, to catch a broken command line before
#        device time is spent:  DEVICE_SMOKE=1 bash scripts/gpu_checks.sh all   (nfe samples the toy mfu run)
# Results go to $OUT (the device tool brings them back), else to outputs/gpu_checks.
set -uo pipefail
cd "$(dirname "$0")/.."
CHECK=${1:?usage: gpu_checks.sh mfu|nfe|art|all}
OUT=${OUT:-outputs/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline HYDRA_FULL_ERROR=1
if [ -z "${DEVICE_SMOKE:-}" ]; then
  PY=python3
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devkit/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
  [ -d .devkit/mnist ] && (cd .devkit/mnist/MNIST/raw && for f in *.gz; do [ -f "${f%.gz}" ] || gunzip -k "$f"; done)
  mkdir -p .devkit/data && ln -sfn "$PWD/.devkit/mnist/MNIST" .devkit/data/MNIST && ln -sfn "$PWD/.devkit/art" .devkit/data/art
  export ATELIER_DATA_DIR=$PWD/.devkit/data
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  GPU="trainer=gpu"; DEV=cuda; MFU_T=00:00:05:00; ART_BUDGET=00:00:07:30; ART_MAX=00:00:08:00; ART_MARGIN=30; WARM=50; N=5000; N_ART=2000; BS=128
  NFE_ROWS=ddpm-1000,dpmpp_sde-25,dpmpp_sde-50,unipc-25,unipc-50
else  # toy sizes on this CPU: the same commands, minutes
  PY=${PYTHON:-.venv/bin/python}
  export ATELIER_DATA_DIR=${ATELIER_DATA_DIR:-../shared/data} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  GPU="trainer=cpu"; DEV=cpu; MFU_T=00:00:00:20; ART_BUDGET=00:00:00:30; ART_MAX=00:00:01:00; ART_MARGIN=5; WARM=2; N=40; N_ART=40; BS=16
  NFE_ROWS=ddpm-20,dpmpp_sde-5; NFE_CKPT=${NFE_CKPT:-$OUT/mfu_run/checkpoints/last.ckpt}
fi
run_mfu () {
  local R=$OUT/mfu_run
  $PY train.py model=ddpm data=mnist data.image_size=32 data.batch_size=$BS data.num_workers=6 $GPU \
      "callbacks=[default,perf]" callbacks.perf.warmup_steps=$WARM callbacks.sample_grid=null logger=csv \
      trainer.max_time=$MFU_T trainer.max_steps=1000000 trainer.limit_val_batches=0 export_pipeline=false \
      task_name=gpu_mfu hydra.run.dir=$R 2>&1 | tail -n 25 > "$OUT/mfu.log"
  cp $R/perf.json "$OUT/perf.json" && cat "$OUT/perf.json"
  [ -n "${DEVICE_SMOKE:-}" ] || rm -rf $R/checkpoints   # the smoke run's last.ckpt feeds its `nfe` check
}
run_nfe () {
  $PY scripts/fid_vs_nfe.py "${NFE_CKPT:-.devkit/ckpt/ddpm.ckpt}" --rows $NFE_ROWS --num-samples $N \
      --batch-size $((BS * 8)) --device $DEV --data-dir "$ATELIER_DATA_DIR" --cache-dir "$OUT/stats" \
      --out "$OUT/fid_vs_nfe" 2>&1 | tail -n 30 | tee "$OUT/nfe.log"
}
run_art () {
  local R=$OUT/art_run
  $PY train.py experiment=ddpm_art_gpu $GPU logger=csv callbacks.time_budget.budget=$ART_BUDGET callbacks.time_budget.margin_s=$ART_MARGIN \
      trainer.max_time=$ART_MAX export_pipeline=false hydra.run.dir=$R 2>&1 | tail -n 15 > "$OUT/art_train.log"
  cp $R/samples/final.png "$OUT/ddpm_art_gpu.png"
  local EV="feature_extractor=art_classifier metrics=[fid,kid,is,precision,recall] num_samples=$N_ART logger=csv"
  $PY evaluate.py ckpt_path=$R/checkpoints/last.ckpt $EV hydra.run.dir=$R/eval64 2>&1 | tail -n 12 > "$OUT/art_eval64.log"
  $PY evaluate.py ckpt_path=$R/checkpoints/last.ckpt $EV reference_image_size=32 sample_image_size=32 \
      hydra.run.dir=$R/eval32 2>&1 | tail -n 12 > "$OUT/art_eval32.log"
  cat "$OUT"/art_*.log
  rm -rf $R/checkpoints/step_*.ckpt
}
case $CHECK in
  mfu) run_mfu ;;
  nfe) run_nfe ;;
  art) run_art ;;
  all) run_mfu; run_nfe; run_art ;;
  *) echo "unknown check $CHECK: mfu | nfe | art | all"; exit 2 ;;
esac
