#!/usr/bin/env bash
# The end-to-end RDOQ run shared by the gen_rd_*_all.sh drivers: weight curves and output-
# activation curves (one background process per GPU in CUDA_VISIBLE_DEVICES, or one CPU process),
# then the solver, evaluation and the results table. The drivers set the variables below; nothing
# here is meant to be edited.
set -euo pipefail

: "${ESTIMATOR:?}" "${MODELNAME:?}" "${DATASET:?}" "${DATAKIND:?}" "${NCHANNELBATCH:?}"
: "${TESTSIZE:?}" "${BATCHSIZE:?}" "${MAXRATES:?}" "${MAXDEADZONES:?}" "${SOLVER:?}"
: "${TARGET_RATES:?}" "${OUTDIR:?}" "${EVALSIZE:?}"
PY=${PY:-python}
EXTRA_CURVE_FLAGS=${EXTRA_CURVE_FLAGS:-}
EXTRA_SOLVER_FLAGS=${EXTRA_SOLVER_FLAGS:-}
MODEL_FLAGS=${MODEL_FLAGS:-}  # e.g. --checkpoint FILE

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
case "$ESTIMATOR" in
  measured) WSCRIPT=generate_RD_curves_batch.py; ASCRIPT=generate_RD_curves_act_out_nchan.py
            ESTIMATOR_FLAGS="" ;;
  hessian) WSCRIPT=generate_rd_curves_batch_hessian.py
           ASCRIPT=generate_RD_curves_act_out_nchan_hessian.py
           ESTIMATOR_FLAGS=${HESSIAN_FLAGS:-} ;;  # e.g. --paper-hessian
  *) echo "ESTIMATOR must be measured or hessian, got '$ESTIMATOR'" >&2; exit 2 ;;
esac
case "$SOLVER" in
  dp) SSCRIPT=generate_DP_batch_distortion_act_out_nchan.py ;;
  lg) SSCRIPT=generate_LG_batch_distortion_act_out_nchan.py ;;
  *) echo "SOLVER must be dp or lg, got '$SOLVER'" >&2; exit 2 ;;
esac

# One part per visible GPU; CPU_PARTS processes on the CPU when no GPU is visible.
IFS=',' read -r -a GPUS <<< "${CUDA_VISIBLE_DEVICES:-}"
if [ "${#GPUS[@]}" -eq 0 ] || [ -z "${GPUS[0]}" ]; then
  GPUS=()
  for _ in $(seq "${CPU_PARTS:-1}"); do GPUS+=(""); done
fi
NPARTS=${#GPUS[@]}

# shellcheck disable=SC2206
MODEL=(--archname "$MODELNAME" --dataset "$DATAKIND" --datapath "$DATASET" $MODEL_FLAGS)
# shellcheck disable=SC2206
CURVES=("${MODEL[@]}" --testsize "$TESTSIZE" --batchsize "$BATCHSIZE"
        --nchannelbatch "$NCHANNELBATCH" --maxrates "$MAXRATES" --outdir "$OUTDIR/curves"
        $ESTIMATOR_FLAGS)

run_parts() {  # run_parts SCRIPT ARGS...: one background process per part, fail if any fails
  local script=$1; shift
  local pids=() i
  for i in "${!GPUS[@]}"; do
    local device=(--device cpu)
    if [ -n "${GPUS[$i]}" ]; then device=(--device cuda:0); fi
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES="${GPUS[$i]}" "$PY" "$ROOT/classification/$script" "$@" \
      --part_id "$i" --num_parts "$NPARTS" "${device[@]}" --quiet $EXTRA_CURVE_FLAGS >/dev/null &
    pids+=($!)
  done
  local failed=0
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then echo "part $i of $script failed" >&2; failed=1; fi
  done
  return "$failed"
}

START=$SECONDS
echo "== $MODELNAME: $ESTIMATOR weight curves ($NPARTS part(s))"
run_parts "$WSCRIPT" "${CURVES[@]}" --maxdeadzones "$MAXDEADZONES"
echo "== $MODELNAME: $ESTIMATOR activation curves ($NPARTS part(s))"
run_parts "$ASCRIPT" "${CURVES[@]}"
echo "== curves took $((SECONDS - START)) s"

NAME=$(basename "$MODELNAME")
WCURVES="$OUTDIR/curves/${NAME}_ndz_$(printf %04d "$MAXDEADZONES")_nr_$(printf %04d "$MAXRATES")_ns_$(printf %04d "$TESTSIZE")_nf_$(printf %04d "$NCHANNELBATCH")_rdcurves_channelwise_opt_dist"
echo "== $MODELNAME: $SOLVER allocation at $TARGET_RATES bits, evaluation"
# shellcheck disable=SC2086
CUDA_VISIBLE_DEVICES="${GPUS[0]}" "$PY" "$ROOT/classification/$SSCRIPT" "${MODEL[@]}" \
  --pathrdcurve "$WCURVES" --act_curve_root_dir "$OUTDIR/curves" --target_rates $TARGET_RATES \
  --testsize "$EVALSIZE" --batchsize "$BATCHSIZE" --outdir "$OUTDIR" --quiet \
  $EXTRA_SOLVER_FLAGS >/dev/null
"$PY" "$ROOT/classification/show_results.py" "$OUTDIR"
