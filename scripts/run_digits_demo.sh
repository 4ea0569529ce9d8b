#!/usr/bin/env bash
# The main job on the embedded default: RDOQ (DP and Lagrangian) vs uniform quantization of the
# bundled digits models, CPU, no network. Edit the variables below (or set them in the
# environment); `make demo` runs this with the defaults.
set -euo pipefail

PY=${PY:-python}                         # the Python that has rdoq installed
OUT=${OUT:-runs/demo}                    # everything is written under this directory
ARCHS=${ARCHS:-"digits_cnn digits_vit"}  # bundled models
CALIB=${CALIB:-64}                       # calibration images (from the train split)
NF=${NF:-8}                              # channels per group (--nchannelbatch)
NR=${NR:-9}                              # bit widths 0..NR-1 (--maxrates)
NDZ=${NDZ:-4}                            # dead-zone ratios of the weight curves (--maxdeadzones)
TARGETS=${TARGETS:-"2 3 4 6"}            # target bits for weights and for activations alike

cd "$(dirname "$0")/.."
for ARCH in $ARCHS; do
  DIR="$OUT/$ARCH"
  COMMON=(--archname "$ARCH" --dataset digits)
  CURVES=("${COMMON[@]}" --testsize "$CALIB" --nchannelbatch "$NF" --maxrates "$NR"
          --outdir "$DIR/curves")
  echo "== $ARCH: weight curves"
  "$PY" classification/generate_RD_curves_batch.py "${CURVES[@]}" --maxdeadzones "$NDZ" >/dev/null
  echo "== $ARCH: activation curves (layer outputs)"
  "$PY" classification/generate_RD_curves_act_out_nchan.py "${CURVES[@]}" >/dev/null
  WCURVES="$DIR/curves/${ARCH}_ndz_$(printf %04d "$NDZ")_nr_$(printf %04d "$NR")_ns_$(printf %04d "$CALIB")_nf_$(printf %04d "$NF")_rdcurves_channelwise_opt_dist"
  # Separate budgets (W bits <= target, A bits <= target) so that every method is compared with
  # the uniform baseline at the same weight and activation bit widths.
  ALLOC=("${COMMON[@]}" --pathrdcurve "$WCURVES" --act_curve_root_dir "$DIR/curves"
         --target_rates $TARGETS --act-target-rates $TARGETS --outdir "$DIR")
  echo "== $ARCH: dynamic programming"
  "$PY" classification/generate_DP_batch_distortion_act_out_nchan.py "${ALLOC[@]}" >/dev/null
  echo "== $ARCH: Lagrangian"
  "$PY" classification/generate_LG_batch_distortion_act_out_nchan.py "${ALLOC[@]}" >/dev/null
  echo "== $ARCH: uniform baseline"
  "$PY" classification/uniform_baseline.py "${COMMON[@]}" --calibsize "$CALIB" \
    --target_rates $TARGETS --outdir "$DIR" >/dev/null
done
"$PY" classification/show_results.py "$OUT" --plot "$OUT/results.png"
