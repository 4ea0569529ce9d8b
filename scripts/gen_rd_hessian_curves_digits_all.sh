#!/usr/bin/env bash
# The second-order (Hessian) end-to-end run on the bundled digits default (CPU, offline): curves,
# DP or Lagrangian allocation, evaluation on the digits test split, results table.
#   bash scripts/gen_rd_hessian_curves_digits_all.sh            (or e.g. MODELNAME=digits_vit SOLVER=lg bash …)
# Edit the variables below or set them in the environment.
set -euo pipefail

export MODELNAME=${MODELNAME:-digits_cnn}          # digits_cnn or digits_vit
export DATASET=${DATASET:-.}                        # unused by the bundled data
export NCHANNELBATCH=${NCHANNELBATCH:-8}           # channels per group
export TESTSIZE=${TESTSIZE:-64}                     # calibration images (train split)
export BATCHSIZE=${BATCHSIZE:-16}                   # samples per gradient sweep / eval batch
export MAXRATES=${MAXRATES:-9}                      # bit widths 0..MAXRATES-1
export MAXDEADZONES=${MAXDEADZONES:-4}              # dead-zone ratios of the weight curves
export SOLVER=${SOLVER:-dp}                         # dp or lg
export TARGET_RATES=${TARGET_RATES:-"3 4 6"}        # joint average bits
export EVALSIZE=${EVALSIZE:--1}                     # evaluation images (-1 = the test split)
export CPU_PARTS=${CPU_PARTS:-1}                    # curve processes when no GPU is visible
export OUTDIR=${OUTDIR:-runs/digits_hessian}
export HESSIAN_FLAGS=${HESSIAN_FLAGS:-}             # e.g. --paper-hessian (the paper's probe and κ)
export ESTIMATOR=hessian DATAKIND=digits

exec bash "$(dirname "$0")/lib/rd_pipeline.sh"
