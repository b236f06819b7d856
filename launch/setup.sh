#!/usr/bin/env bash
# One-command set-up of horovod-truncq on a fresh Debian machine (CPU or GPU).
#
# Creates .venv/ at the repository root, installs torch/torchvision (or reuses an installed torch),
# Open MPI and Fashion-MNIST (when apt is available), builds Horovod 0.28.1 from source with the
# fixes it needs against current PyTorch, caches the wheel, installs this package in editable mode
# and checks the result. Idempotent: a second run reuses everything and takes seconds.
#
# Environment overrides (all optional):
#   PYTHON                 interpreter to build the venv from (default: python3); where it has torch,
#                          also inside a venv of its own, .venv uses that torch
#   TORCH_SPEC             pip requirement(s) for torch when none is importable
#                          (default: "torch==2.14.1 torchvision==0.29.1")
#   TRUNCQ_SKIP_APT=1      never call apt-get
#   TRUNCQ_CACHE           wheel cache folder (default: ~/.cache/horovod-truncq)
#   HOROVOD_WITH_MPI       1/0: build with MPI (default: 1 when mpicxx is found)
#   HOROVOD_GPU_OPERATIONS NCCL or empty (default: NCCL when a GPU, nvcc and NCCL are found)
#   HOROVOD_VERSION        default 0.28.1
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.venv
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
CACHE=${TRUNCQ_CACHE:-$HOME/.cache/horovod-truncq}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
LOGDIR=$CACHE/logs
mkdir -p "$CACHE/wheels" "$LOGDIR"

step() { printf '\n==> [setup] %s\n' "$*"; }
CURRENT_STEP="start"; CURRENT_LOG=""
on_error() {
  echo "!! [setup] step failed: $CURRENT_STEP" >&2
  if [ -n "$CURRENT_LOG" ]; then
    echo "!! [setup] log: $CURRENT_LOG (last lines below)" >&2
    tail -n 30 "$CURRENT_LOG" >&2 || true
  fi
}
trap on_error ERR
# run_logged NAME CMD...: run a command with its output in $LOGDIR/NAME.log.
run_logged() {
  local name=$1; shift
  CURRENT_LOG=$LOGDIR/$name.log
  "$@" >"$CURRENT_LOG" 2>&1
  CURRENT_LOG=""
}

# ---------------------------------------------------------------- system packages
CURRENT_STEP="system packages (apt)"
step "$CURRENT_STEP"
apt_packages=(openmpi-bin libopenmpi-dev dataset-fashion-mnist)
if [ "${TRUNCQ_SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "installing ${missing[*]}"
    run_logged apt $SUDO sh -c "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q ${missing[*]}"
  else
    echo "already installed: ${apt_packages[*]}"
  fi
else
  echo "apt not used; install Open MPI (optional) and provide MNIST-format data yourself"
fi

# ---------------------------------------------------------------- virtual environment
CURRENT_STEP="virtual environment in $VENV"
step "$CURRENT_STEP"
if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "$PYTHON already has torch: the venv sees its site-packages"
    # Without ensurepip (some distributions split it out), .venv uses the pip of $PYTHON's packages.
    run_logged venv "$PYTHON" -m venv --system-site-packages "$VENV" ||
      run_logged venv "$PYTHON" -m venv --clear --system-site-packages --without-pip "$VENV"
    # A venv made from another venv's python sees the base interpreter's packages, not that venv's.
    outer=$("$PYTHON" -c "import site, sys; print(site.getsitepackages()[0] if sys.prefix != sys.base_prefix else '')")
    if [ -n "$outer" ]; then
      "$VENV/bin/python" -c "import site, sys; open(site.getsitepackages()[0] + '/outer-venv.pth', 'w').write(sys.argv[1] + '\n')" "$outer"
    fi
  else
    run_logged venv "$PYTHON" -m venv "$VENV"
  fi
fi
PY=$VENV/bin/python
PIP=("$PY" -m pip install -q --disable-pip-version-check)
echo "python: $("$PY" --version)"

CURRENT_STEP="python packages (torch, numpy, mpi4py, build tools)"
step "$CURRENT_STEP"
if "$PY" -c "import torch" 2>/dev/null; then
  echo "reusing torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "installing $TORCH_SPEC (several GB; pip takes it from the local disk where it lies there)"
  # shellcheck disable=SC2086
  run_logged pip-torch "${PIP[@]}" $TORCH_SPEC
fi
"$PY" -c "import torchvision" 2>/dev/null || run_logged pip-torchvision "${PIP[@]}" torchvision
build_deps=(numpy cffi cloudpickle psutil pyyaml packaging setuptools wheel pytest matplotlib)
command -v mpicc >/dev/null && build_deps+=(mpi4py)
run_logged pip-deps "${PIP[@]}" "${build_deps[@]}"

# ---------------------------------------------------------------- Horovod
CURRENT_STEP="Horovod $HOROVOD_VERSION"
step "$CURRENT_STEP"
read -r PYVER TORCHVER CUDAVER < <("$PY" -c "import sys, torch; print(f'py{sys.version_info[0]}{sys.version_info[1]}', torch.__version__.replace('+', '_'), torch.version.cuda or 'cpu')")

if [ -z "${HOROVOD_WITH_MPI+x}" ]; then
  if command -v mpicxx >/dev/null; then HOROVOD_WITH_MPI=1; else HOROVOD_WITH_MPI=0; fi
fi
if [ "$CUDAVER" != cpu ] && [ -z "${CUDA_HOME:-}" ]; then
  for d in "/usr/local/cuda-$CUDAVER" /usr/local/cuda; do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME=$d; break; fi
  done
fi
NCCL_DIR=$("$PY" -c "import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__) if nvidia.nccl.__file__ else list(nvidia.nccl.__path__)[0])" 2>/dev/null || true)
if [ -z "${HOROVOD_GPU_OPERATIONS+x}" ]; then
  HOROVOD_GPU_OPERATIONS=""
  if { command -v nvcc >/dev/null || [ -n "${CUDA_HOME:-}" ]; } && [ -n "$NCCL_DIR" ] && "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    HOROVOD_GPU_OPERATIONS=NCCL
  fi
fi
flavour="gloo"
[ "$HOROVOD_WITH_MPI" = 1 ] && flavour="$flavour-mpi"
[ -n "$HOROVOD_GPU_OPERATIONS" ] && flavour="$flavour-$(echo "$HOROVOD_GPU_OPERATIONS" | tr 'A-Z' 'a-z')"
KEY="horovod-$HOROVOD_VERSION-$PYVER-torch$TORCHVER-cuda$CUDAVER-$flavour"
WHEEL_DIR=$CACHE/wheels/$KEY
echo "build key: $KEY"

if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
  BUILD=$(mktemp -d "${TMPDIR:-/tmp}/truncq-horovod.XXXXXX")
  CURRENT_STEP="download Horovod $HOROVOD_VERSION sdist"
  run_logged horovod-download "$PY" -m pip download -q --no-build-isolation --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$BUILD"
  tar -xzf "$BUILD"/horovod-*.tar.gz -C "$BUILD"
  SRC=$(echo "$BUILD"/horovod-"$HOROVOD_VERSION")
  # Current torch headers need C++20; Horovod 0.28.1 asks for C++14.
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 20)/' "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"

  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1
  export CMAKE_POLICY_VERSION_MINIMUM=3.5          # CMake 4 rejects the bundled gloo's minimum
  export MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}
  if [ "$HOROVOD_WITH_MPI" = 1 ]; then export HOROVOD_WITH_MPI=1; else unset HOROVOD_WITH_MPI; export HOROVOD_WITHOUT_MPI=1; fi
  gcc_major=$(gcc -dumpversion | cut -d. -f1)
  if [ "$gcc_major" -ge 13 ]; then export CXXFLAGS="${CXXFLAGS:-} -include cstdint -include string"; fi
  if [ -n "${CUDA_HOME:-}" ]; then
    # CMake derives the toolkit root from the first nvcc on PATH, which may be a wrapper elsewhere.
    export CUDAToolkit_ROOT=$CUDA_HOME CUDACXX=$CUDA_HOME/bin/nvcc PATH=$CUDA_HOME/bin:$PATH
  fi
  if [ -n "$HOROVOD_GPU_OPERATIONS" ]; then
    export HOROVOD_GPU_OPERATIONS
    export HOROVOD_NCCL_INCLUDE=${HOROVOD_NCCL_INCLUDE:-$NCCL_DIR/include} HOROVOD_NCCL_LIB=${HOROVOD_NCCL_LIB:-$NCCL_DIR/lib}
    [ -e "$HOROVOD_NCCL_LIB/libnccl.so" ] || ln -s libnccl.so.2 "$HOROVOD_NCCL_LIB/libnccl.so"
    export HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")}
  else
    unset HOROVOD_GPU_OPERATIONS
  fi
  echo "building (MPI=${HOROVOD_WITH_MPI:-0}, GPU ops=${HOROVOD_GPU_OPERATIONS:-none}, CUDA_HOME=${CUDA_HOME:-none}); about 5 minutes on 2 cores"
  CURRENT_STEP="build Horovod $HOROVOD_VERSION wheel"
  CURRENT_LOG=$LOGDIR/horovod-build.log
  (cd "$BUILD" && "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$BUILD/dist" "$SRC") >"$CURRENT_LOG" 2>&1 &
  pid=$!
  start=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    sleep 20
    kill -0 "$pid" 2>/dev/null || break
    last=$(grep -o '\[ *[0-9]*%\][^/]*' "$CURRENT_LOG" | tail -n 1 || true)
    printf '    ... %3ds %s\n' $((SECONDS - start)) "${last:-configuring}"
  done
  wait "$pid"
  CURRENT_LOG=""
  mkdir -p "$WHEEL_DIR"
  cp "$BUILD"/dist/horovod-*.whl "$WHEEL_DIR/"
  rm -rf "$BUILD"
  echo "built in $((SECONDS - start)) s, cached in $WHEEL_DIR"
else
  echo "cached wheel: $(ls "$WHEEL_DIR"/horovod-*.whl)"
fi
CURRENT_STEP="install Horovod wheel"
if [ ! -x "$VENV/bin/horovodrun" ] || [ "$("$PY" -c 'import horovod; print(horovod.__version__)' 2>/dev/null)" != "$HOROVOD_VERSION" ]; then
  run_logged horovod-install "${PIP[@]}" --no-deps --force-reinstall "$WHEEL_DIR"/horovod-*.whl
fi

# ---------------------------------------------------------------- this package
CURRENT_STEP="install horovod_truncq (editable)"
step "$CURRENT_STEP"
run_logged truncq-install "${PIP[@]}" --no-build-isolation --no-deps -e "$ROOT"

# ---------------------------------------------------------------- check
CURRENT_STEP="check the Horovod build"
step "$CURRENT_STEP"
CURRENT_LOG=$LOGDIR/check-build.log
"$VENV/bin/horovodrun" --check-build | tee "$CURRENT_LOG"
grep -q '\[X\] PyTorch' "$CURRENT_LOG" || { echo "Horovod has no PyTorch support" >&2; false; }
grep -q '\[X\] Gloo' "$CURRENT_LOG" || { echo "Horovod has no Gloo support" >&2; false; }
CURRENT_LOG=""
"$PY" -c "import horovod_truncq, horovod.torch; print('horovod_truncq', horovod_truncq.__version__, 'ready')"
step "done in ${SECONDS}s; activate with: source .venv/bin/activate"
