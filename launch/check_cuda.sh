#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one command sized for a short lease of the machine:
#   1. set-up (launch/setup.sh builds Horovod with NCCL), in the background while
#   2. the CUDA tests run (pytest -m gpu: compiled equals eager, CPU decodes alike, host waits, the DDP
#      hook over NCCL with CUDA's sync debug mode at "error"), on
#      $PYTHON (default .venv/bin/python where set up, else python3, which must have torch) with this
#      checkout on PYTHONPATH, which also fills the compile cache for step 4;
#   3. Horovod with NCCL carries the payloads through the exchanges (tests/test_cuda.py, -np 1);
#   4. where the codec's time goes on the GPU: the profiler's kernel table of each scheme at 3 bits;
#   5. the codec benchmark at 100 M elements (examples/bench_codec.py --device cuda).
# Each step has a time limit and writes its log to $LOGS (default runs/cuda) as it goes, so a run cut
# short still says what passed. Exits non-zero when a step failed.
#
#   bash launch/check_cuda.sh
#   TEST_S=400 PROFILE_S=60 BENCH_S=300 BENCH_ARGS="--bits 3 --repeats 20" bash launch/check_cuda.sh
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
LOGS=${LOGS:-$ROOT/runs/cuda}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
failed=0
step() { echo "== $SECONDS s: $*" | tee -a "$LOGS/steps.txt"; }

"$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null ||
  { echo "no CUDA device (or no torch) for $PYTHON" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$LOGS/gpu.txt" 2>&1
step "start"
(bash launch/setup.sh > "$LOGS/setup.log" 2>&1; echo "setup exit $?" >> "$LOGS/setup.log") &
setup=$!

parallel=()
"$PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n 4)
PYTHONPATH=$ROOT TORCHINDUCTOR_COMPILE_THREADS=3 timeout "${TEST_S:-300}" "$PYTHON" -m pytest tests/test_cuda.py \
  tests/test_quantizers.py -m gpu -k "not nccl" "${parallel[@]}" -v -p no:cacheprovider > "$LOGS/tests.log" 2>&1
status=$?; step "CUDA tests: exit $status"; [ $status = 0 ] || failed=1

wait $setup
step "set-up: $(tail -n 1 "$LOGS/setup.log")"
if grep -q "setup exit 0" "$LOGS/setup.log"; then
  timeout "${NCCL_S:-120}" .venv/bin/python -m pytest tests/test_cuda.py -k nccl -v -p no:cacheprovider > "$LOGS/nccl.log" 2>&1
  status=$?; step "Horovod with NCCL: exit $status"; [ $status = 0 ] || failed=1
else
  failed=1
fi

PYTHONPATH=$ROOT timeout "${PROFILE_S:-120}" "$PYTHON" examples/bench_codec.py --device cuda --elements 100000000 \
  --bits 3 --repeats 3 --profile > "$LOGS/profile_cuda.txt" 2>&1
status=$?; step "profile: exit $status"; [ $status = 0 ] || failed=1

# shellcheck disable=SC2086
PYTHONPATH=$ROOT timeout "${BENCH_S:-240}" "$PYTHON" examples/bench_codec.py --device cuda --elements 100000000 \
  ${BENCH_ARGS:-} > "$LOGS/bench_codec_cuda.txt" 2>&1
status=$?; step "benchmark: exit $status"; [ $status = 0 ] || failed=1
exit $failed
