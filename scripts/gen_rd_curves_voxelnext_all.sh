#!/usr/bin/env bash
# RDOQ on an OpenPCDet detector (the paper's VoxelNeXt on nuScenes): weight RD curves of the
# backbone's sparse convs (one process per GPU in CUDA_VISIBLE_DEVICES, or CPU_PARTS CPU
# processes) and, with ACT_CURVES=1, their output-activation curves; then the allocation at each
# target rate, applied and evaluated (mAP/NDS need a GPU).
#   CUDA_VISIBLE_DEVICES=0,1 PCDET_TOOLS=~/OpenPCDet/tools \
#     CKPT=~/OpenPCDet/output/voxelnext_nuscenes_kernel1.pth bash scripts/gen_rd_curves_voxelnext_all.sh
# Edit the variables below or set them in the environment.
set -euo pipefail

PCDET_TOOLS=${PCDET_TOOLS:-.}                        # OpenPCDet's tools/ directory
CFG_FILE=${CFG_FILE:-cfgs/nuscenes_models/cbgs_voxel0075_voxelnext.yaml}  # relative to tools/
CKPT=${CKPT:-../output/nuscene_models/voxelnext_nuscenes_kernel1.pth}     # pcdet checkpoint
DATA=${DATA:-pcdet}                                  # pcdet (nuScenes train split) or synthetic
CALIB_FRAMES=${CALIB_FRAMES:-4}                      # calibration frames
POINTS_PER_FRAME=${POINTS_PER_FRAME:-100000}         # synthetic frames only
NCHANNELBATCH=${NCHANNELBATCH:-128}                  # output channels per group
MAXRATES=${MAXRATES:-11}                             # bit widths 0..MAXRATES-1
MAXDEADZONES=${MAXDEADZONES:-10}                     # dead-zone ratios
MAXSTEPS=${MAXSTEPS:-16}                             # step candidates per bit width
ESTIMATOR=${ESTIMATOR:-measured}                     # measured or hessian
LAYERS=${LAYERS:-backbone_3d}                        # + backbone_2d, head (comma-separated)
SOLVER=${SOLVER:-dp}                                 # dp or lg
TARGET_RATES=${TARGET_RATES:-"4 6 8"}                # average bits per quantized weight
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-4}                # frames per evaluation batch
SKIP_EVAL=${SKIP_EVAL:-}                             # non-empty: no mAP/NDS (CPU machines)
ACT_CURVES=${ACT_CURVES:-}                           # non-empty: also activation curves, joint W/A
ACT_MAXSTEPS=${ACT_MAXSTEPS:-16}                     # activation step candidates per bit width
ACT_TARGET_RATES=${ACT_TARGET_RATES:-}               # e.g. "8": average activation bits (else joint)
OUTDIR=${OUTDIR:-rdoq_voxelnext}                     # everything is written under this directory
SET_CFGS=${SET_CFGS:-}                               # pcdet --set overrides "KEY VALUE ..."
EXTRA_CURVE_FLAGS=${EXTRA_CURVE_FLAGS:-}             # e.g. "--scale-octaves 0"
EXTRA_SOLVER_FLAGS=${EXTRA_SOLVER_FLAGS:-}           # e.g. "--bit_list 0 2 4 8"
PY=${PY:-python}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR=$(mkdir -p "$OUTDIR" && cd "$OUTDIR" && pwd)
CURVES="$OUTDIR/curves"

# One part per visible GPU; CPU_PARTS processes on the CPU when no GPU is visible.
IFS=',' read -r -a GPUS <<< "${CUDA_VISIBLE_DEVICES:-}"
if [ "${#GPUS[@]}" -eq 0 ] || [ -z "${GPUS[0]}" ]; then
  GPUS=()
  for _ in $(seq "${CPU_PARTS:-1}"); do GPUS+=(""); done
fi
NPARTS=${#GPUS[@]}

DETECTOR=(--pcdet_tools "$PCDET_TOOLS" --cfg_file "$CFG_FILE" --pretrained_model "$CKPT")
# shellcheck disable=SC2206
SETS=(); if [ -n "$SET_CFGS" ]; then SETS=(--set $SET_CFGS); fi

# curves KIND DIR [flags...]: one curve process per part, all of them waited for.
curves() {
  local kind=$1 dir=$2
  shift 2
  local pids=() failed=0 i
  for i in "${!GPUS[@]}"; do
    local device=(--device cpu)
    if [ -n "${GPUS[$i]}" ]; then device=(--device cuda:0); fi
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES="${GPUS[$i]}" "$PY" "$ROOT/openpcdet/generate_rd_curves_batch.py" \
      "${DETECTOR[@]}" --kind "$kind" --layers "$LAYERS" --data "$DATA" \
      --calib_frames "$CALIB_FRAMES" --points_per_frame "$POINTS_PER_FRAME" \
      --nchannelbatch "$NCHANNELBATCH" --maxrates "$MAXRATES" --pathrdcurve "$dir" \
      --part_id "$i" --num_parts "$NPARTS" "${device[@]}" --quiet "$@" \
      $EXTRA_CURVE_FLAGS ${SETS[@]+"${SETS[@]}"} >/dev/null &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then echo "$kind curve part $i failed" >&2; failed=1; fi
  done
  [ "$failed" -eq 0 ]
}

START=$SECONDS
echo "== $ESTIMATOR weight curves ($NPARTS part(s)) -> $CURVES"
curves weight "$CURVES" --maxdeadzones "$MAXDEADZONES" --maxsteps "$MAXSTEPS" \
  --estimator "$ESTIMATOR"
ACTS=()
if [ -n "$ACT_CURVES" ]; then
  echo "== measured output-activation curves ($NPARTS part(s)) -> $OUTDIR/act_curves"
  curves act "$OUTDIR/act_curves" --maxsteps "$ACT_MAXSTEPS"
  ACTS=(--act_curve_root_dir "$OUTDIR/act_curves")
  # shellcheck disable=SC2206
  if [ -n "$ACT_TARGET_RATES" ]; then ACTS+=(--act-target-rates $ACT_TARGET_RATES); fi
fi
echo "== curves took $((SECONDS - START)) s"

echo "== $SOLVER allocation at $TARGET_RATES bits, evaluation"
EVAL=(); if [ -n "$SKIP_EVAL" ]; then EVAL=(--skip-eval); fi
# shellcheck disable=SC2086
CUDA_VISIBLE_DEVICES="${GPUS[0]}" "$PY" "$ROOT/openpcdet/generate_DP_frontier_batch_act_nchan.py" \
  "${DETECTOR[@]}" --pathrdcurve "$CURVES" --solver "$SOLVER" --target_rates $TARGET_RATES \
  --batch_size "$EVAL_BATCH_SIZE" --outdir "$OUTDIR" --quiet ${EVAL[@]+"${EVAL[@]}"} \
  ${ACTS[@]+"${ACTS[@]}"} $EXTRA_SOLVER_FLAGS ${SETS[@]+"${SETS[@]}"}
"$PY" "$ROOT/classification/show_results.py" "$OUTDIR"
