#!/usr/bin/env bash
# The main job: set up (idempotent), then 8-worker Horovod training with a truncated quantizer on
# Fashion-MNIST (offline). Extra arguments go to examples/train_mnist.py, e.g. --compressor tuqsgd --bits 2.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
NP=${NP:-8}
echo "==> [train] horovodrun -np $NP (Gloo) examples/train_mnist.py --compressor tnqsgd --bits 3 --steps 300 $*"
exec .venv/bin/horovodrun -np "$NP" -H "localhost:$NP" --gloo \
  .venv/bin/python examples/train_mnist.py --compressor tnqsgd --bits 3 --steps 300 --out-dir runs/main "$@"
