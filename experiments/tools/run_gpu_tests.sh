#!/usr/bin/env bash
# The whole `-m gpu` test suite on the lent GPU machine, in one command from the repo root:
#
#   bash experiments/tools/run_gpu_tests.sh  # complete log in $OUT/pytest_gpu.log (OUT=/tmp/out)
#
# The machine's image has JAX with CUDA, torch, transformers, flax, optax, chex, orbax,
# matplotlib, pytest and hypothesis: nothing is installed over them.  What it lacks (gguf, grain,
# fastapi, ...) travels as wheels in carried `.whl/` and `.wh2/` folders, installed into
# /tmp/site when they are there; without them the test modules that need them are skipped
# at collection (they import those packages lazily or through pytest.importorskip).
# Exit status: pytest's.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)   # this file is experiments/tools/run_gpu_tests.sh
cd "$ROOT"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG=$OUT/pytest_gpu.log
SITE=/tmp/site
# never NVLink multicast on the shared hosts
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

for w in .whl .wh2; do
  compgen -G "$w/*.whl" > /dev/null || continue
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" $w/*.whl; then
    echo "installing $w/*.whl into $SITE failed" | tee "$LOG"
    exit 1
  fi
done
# the repo first (its jaxturbo, pallas_kernels and tests), then the wheels of this or an
# earlier call on the same warm machine
export PYTHONPATH=$ROOT
[ -d "$SITE" ] && PYTHONPATH=$ROOT:$SITE

{
  echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(nvidia-smi --query-gpu=name,memory.total \
    --format=csv,noheader 2>/dev/null | head -1)"
  python3 -c "import jax; print('# jax', jax.__version__, jax.devices())"
  # compilation dominates and is CPU-bound: GPU_TEST_WORKERS pytest-xdist workers (when the
  # wheel is there) share the GPU, each preallocating a slice of its memory
  if python3 -c "import xdist" 2>/dev/null && [ "${GPU_TEST_WORKERS:-4}" -gt 1 ]; then
    XLA_PYTHON_CLIENT_MEM_FRACTION=${GPU_TEST_MEM_FRACTION:-0.2} \
      python3 -m pytest -m gpu tests -q -rs -n ${GPU_TEST_WORKERS:-4} --dist loadfile
  else
    python3 -m pytest -m gpu tests -q -rs
  fi
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
