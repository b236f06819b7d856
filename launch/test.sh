#!/usr/bin/env bash
# Set up (idempotent), then run the test suite. Arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
# inductor's compiled passes (tests/test_kernels.py) kept with the Horovod wheel: a second run loads them
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${TRUNCQ_CACHE:-$HOME/.cache/horovod-truncq}/inductor}
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" = 5 ]; then
  echo "!! [test] pytest collected no tests" >&2
  exit 1
fi
exit "$status"
