#!/usr/bin/env bash
# The GPU checks of issue 18, for the first lent device (one NVIDIA GPU), in under 10 minutes.
# Runs on the device image's own python3 (JAX with CUDA, flax, optax, orbax, PyTorch are there;
# nothing can be installed), with this checkout on PYTHONPATH. Everything goes under $OUT
# (default benchmarks/gpu-<date>): one log per step, the JSON/markdown tables, nvidia-smi.
#
#   bash benchmarks/gpu.sh              # or, through the device tool: OUT is set for you
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu-$(date +%Y%m%d)}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() {                       # step NAME SECONDS COMMAND...: run with a time limit, log, keep going
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$OUT/steps.log"
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/steps.log"
}
{ nvidia-smi; $PY -c "import jax, torch; print(jax.__version__, jax.devices(), torch.__version__)"; } \
  > "$OUT/environment.log" 2>&1

# 1. the scaling benchmark against the PyTorch per-client loop (digits-sized clients, K = 4 .. 1024)
step peer_scaling 240 $PY experiments/peer_bench.py --scaling --clients 4 16 64 256 1024 \
  --algos fsl_sage sl_single_server --rounds 3 --out "$OUT/peer"
# 2. ResNet-18 on CIFAR-sized synthetic data: 10 clients, batch 256; ours vs the per-client
#    loop vs one centralised step on the same samples
step resnet18 180 $PY experiments/bench.py --models resnet18:32x32x3 --clients 10 --batch-size 256 \
  --samples-per-client 512 --algos fsl_sage sl_single_server --strategies vmap --step-loops host \
  --rounds 3 --loop-clients 10 --out "$OUT/resnet18"
# 3. the memory plan of every preset (compiles every program for its true shapes; no data)
for preset in cifar10_resnet18 cifar100_resnet18 e2e_gpt2_medium; do
  step "plan_$preset" 60 $PY experiments/run.py --preset "$preset" --memory-plan \
    --out "$OUT/plan_$preset" --overwrite
done
cat "$OUT/steps.log"
