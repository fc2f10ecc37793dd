#!/usr/bin/env bash
# The GPU rows of benchmarks/RESULTS.md in one call: SD1.5-size UNet forward+backward in bf16, side by side
# with the PyTorch baseline (diffusers, bf16 autocast, SDPA, torch.compile) with both sides' op profiles, then
# jdistill alone at larger batches and with XLA attention (steps/s, images/s, MFU). Stages run in order of
# value, each under its own time limit, so that a lease cut short still returns the earlier ones; logs, JSON
# report and profiles go to $OUT (default: ./gpu-out). Budget: BUDGET_S seconds in all (default 560).
#
#     bash benchmarks/gpu_sd15.sh            # on a machine with one NVIDIA GPU, JAX (CUDA), torch, diffusers
#
# Missing pure-Python packages can be put as wheels in .whl/ (installed to /tmp/site first).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $(( ${BUDGET_S:-560} - ($(date +%s) - START) )); }

# .whl/fallback/NAME-VERSION-*.whl: installed only where the machine's NAME is older than VERSION.
wheels=(.whl/*.whl)
for w in .whl/fallback/*.whl; do
  [ -e "$w" ] || continue
  base=$(basename "$w"); name=${base%%-*}; want=$(echo "$base" | cut -d- -f2)
  python3 - "$name" "$want" <<'PY' || wheels+=("$w")
import importlib.metadata as m, sys
from packaging.version import Version
try:
    sys.exit(0 if Version(m.version(sys.argv[1].replace("_", "-"))) >= Version(sys.argv[2]) else 1)
except m.PackageNotFoundError:
    sys.exit(1)
PY
done
if [ -e "${wheels[0]}" ]; then
  echo "installing ${wheels[*]}"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONUNBUFFERED=1
# Both sides share the GPU in the comparison: JAX takes 45% up front instead of its default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
# The comparison's jdistill worker compiles the same program as stage 1: a cache hit, not a second compile.
export JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
WORK=/tmp/jdistill-gpu-bench

{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import jax, flax, optax, torch, diffusers, transformers; print('jax', jax.__version__, jax.devices(), \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__, \
'transformers', transformers.__version__)"
  python3 -c "import jdistill.train" || exit 1
} 2>&1 | tee "$OUT/env.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "environment check failed"; exit 1; }

stage() {  # log name, seconds, command...: output appended to $OUT/<log>.log (at most 8 files come back)
  local name=$1 limit=$2; shift 2
  local budget; budget=$(left)
  (( budget < 30 )) && { echo "== $name: skipped, ${budget}s left"; return; }
  (( limit > budget )) && limit=$budget
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/$name.log"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log" | grep -v -E "^\s*$|Warning|warn\(" | tail -n 60
  echo "== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - START ))s in all"
}

# 1. Side by side with torch at batch 16, then both sides profiled (op tables and jdistill's HLO in prof/).
stage compare 330 python3 benchmarks/torch_baseline.py --size sd15 --bf16 --workload unet --batch 16 \
  --rounds 5 --keep-going --workdir "$WORK" --json "$OUT/compare_b16.json" --profile "$OUT/prof"
# 2. jdistill alone: the best batch, and XLA attention against the fused kernel.
UNET=(env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python3 benchmarks/step_throughput.py --unet --size sd15 --bf16 --steps 20 --workdir "$WORK")
stage unet 150 "${UNET[@]}" --batch 32
stage unet 150 "${UNET[@]}" --batch 64
stage unet 150 "${UNET[@]}" --batch 16 --attention xla
grep -h "UNet fwd+bwd" "$OUT"/unet.log
cat "$OUT/compare_b16.json" 2>/dev/null
