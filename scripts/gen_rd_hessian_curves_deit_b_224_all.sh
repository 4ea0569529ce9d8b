#!/usr/bin/env bash
# The paper's second-order run: Hessian weight + activation curves (one process per GPU in
# CUDA_VISIBLE_DEVICES), DP or Lagrangian allocation, evaluation on val/, results table.
#   CUDA_VISIBLE_DEVICES=0,1,2,3 DATASET=/data/imagenet bash scripts/gen_rd_hessian_curves_deit_b_224_all.sh
# Edit the variables below or set them in the environment.
set -euo pipefail

export MODELNAME=${MODELNAME:-deit_base_patch16_224}
export DATASET=${DATASET:-./ImageNet2012}          # ImageNet root with train/ and val/
export NCHANNELBATCH=${NCHANNELBATCH:-64}          # channels per group
export TESTSIZE=${TESTSIZE:-128}                    # calibration images
export BATCHSIZE=${BATCHSIZE:-4}                    # images per gradient sweep / eval batch
export MAXRATES=${MAXRATES:-11}                     # bit widths 0..MAXRATES-1
export MAXDEADZONES=${MAXDEADZONES:-10}             # dead-zone ratios of the weight curves
export SOLVER=${SOLVER:-dp}                         # dp or lg
export TARGET_RATES=${TARGET_RATES:-"4 6 8"}        # joint average bits
export EVALSIZE=${EVALSIZE:--1}                     # evaluation images (-1 = all of val/)
export OUTDIR=${OUTDIR:-hessian_curves}             # everything is written under this directory
export EXTRA_SOLVER_FLAGS=${EXTRA_SOLVER_FLAGS:-"--minrate 3 --smooth-dists -bcw -bca"}
export MODEL_FLAGS=${MODEL_FLAGS:-}                 # e.g. "--checkpoint deit_b.pth"
export HESSIAN_FLAGS=${HESSIAN_FLAGS:-"--paper-hessian"}  # the paper's eq. 18/21 probe and κ
export DATAKIND=${DATAKIND:-imagenet}              # imagenet (synthetic: smoke tests only)
export ESTIMATOR=hessian

exec bash "$(dirname "$0")/lib/rd_pipeline.sh"
