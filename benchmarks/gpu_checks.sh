#!/usr/bin/env bash
# Every check that needs a GPU, in one run (CI has none): the CUDA tests (classification and
# detection), the measured engine against the naive evaluator on DeiT-B, and the second-order
# curves of DeiT-B (per-layer times in the logs; a step cut by its time limit still reports the
# layers it finished).
# Usage: bash benchmarks/gpu_checks.sh [LOGDIR]   (variables below can be overridden)
set -uo pipefail

LOGDIR=${1:-runs/gpu_checks}
PY=${PY:-python}
ARCH=${ARCH:-deit_base_patch16_224}     # random init: no weights are downloaded
TESTSIZE=${TESTSIZE:-64}
NCHANNELBATCH=${NCHANNELBATCH:-128}
MAXRATES=${MAXRATES:-9}
MAXDEADZONES=${MAXDEADZONES:-4}
TEST_LIMIT_S=${TEST_LIMIT_S:-240}
BENCH_LIMIT_S=${BENCH_LIMIT_S:-120}
HESSIAN_LIMIT_S=${HESSIAN_LIMIT_S:-120}
DEVICE=${DEVICE:-cuda}                  # cpu: a dry run of this script on a small ARCH
CURVEDIR=${CURVEDIR:-$LOGDIR/hessian_curves}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$LOGDIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
status=0
step() {  # step NAME LIMIT_S CMD...: run with a time limit, log to LOGDIR/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" >"$LOGDIR/$name.log" 2>&1
  local rc=$?
  # Progress bars filtered out (they carry no result).
  tr '\r' '\n' <"$LOGDIR/$name.log" | grep -av 'chain/s\|layer/s\|^\s*$' | tail -n 12 | cut -c1-400
  echo "== $name: exit $rc"
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then status=1; fi
}

"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" | tee "$LOGDIR/env.log"

step gpu_tests "$TEST_LIMIT_S" "$PY" -m pytest -q -m gpu -p no:cacheprovider \
  "$ROOT/tests/test_gpu.py"
# Detection: spconv determinism and pcdet's eval path with NMS (skipped, with the reason, where
# spconv has no CUDA kernels or pcdet's CUDA ops are not built).
step pcdet_gpu_tests "$TEST_LIMIT_S" "$PY" -m pytest -q -s -rs -m gpu -p no:cacheprovider \
  "$ROOT/tests/openpcdet/test_pcdet_gpu.py"
MODEL=(--archname "$ARCH" --random-init --dataset synthetic --testsize "$TESTSIZE"
       --nchannelbatch "$NCHANNELBATCH" --device "$DEVICE")
step bench_rd_curves "$BENCH_LIMIT_S" "$PY" "$ROOT/benchmarks/bench_rd_curves.py" "${MODEL[@]}" \
  --maxrates "$MAXRATES" --maxdeadzones 2
step hessian_weights "$HESSIAN_LIMIT_S" "$PY" \
  "$ROOT/classification/generate_rd_curves_batch_hessian.py" "${MODEL[@]}" --maxrates "$MAXRATES" \
  --maxdeadzones "$MAXDEADZONES" --outdir "$CURVEDIR"
step hessian_acts "$HESSIAN_LIMIT_S" "$PY" \
  "$ROOT/classification/generate_RD_curves_act_out_nchan_hessian.py" "${MODEL[@]}" \
  --maxrates "$MAXRATES" --outdir "$CURVEDIR"
for d in "$CURVEDIR"/*/; do
  [ -f "$d/meta.json" ] || continue
  echo "$(basename "$d"): $(find "$d/layers" -name '*.npz' | wc -l) layers written"
done
grep -aoh "gradient rows of.*\|second-order estimator.*" "$LOGDIR"/hessian_*.log
exit "$status"
