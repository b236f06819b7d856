#!/usr/bin/env bash
# Set up (idempotent), then run the test suite. Arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
# inductor's compiled passes (tests/test_kernels.py) kept with the Horovod wheel: a second run loads them.
# inductor-2: the passes of code before e507b38 were traced size-obliviously, and inductor's cache
# serves such a pass traced for one row to several rows, wrongly (docs/quantizers.md, "Speed").
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${TRUNCQ_CACHE:-$HOME/.cache/horovod-truncq}/inductor-2}
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" = 5 ]; then
  echo "!! [test] pytest collected no tests" >&2
  exit 1
fi
exit "$status"
