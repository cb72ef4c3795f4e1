#!/usr/bin/env bash
# The full Fashion-MNIST protocol of the paper (10 seeds, 50 epochs, all five
# losses, both objectives) as populations on one GPU, timed; the run lands in
# $OUT/fashion_mnist (results.jsonl, run.json, tables), its log in $OUT/log.
# Needs .whl/ and .data/ from `benchmarks/gpu/prepare.sh`, carried.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=3 XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-/tmp/gpu-run}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/log"
start=$(date +%s)
python3 -m benchmarks.reproduce --profile fashion_mnist --trainer population \
  --data-dir .data --out /tmp/fashion_mnist "$@" 2>&1 | tee -a "$out/log"
echo "wall time $(( $(date +%s) - start )) s" | tee -a "$out/log"
mkdir -p "$out/fashion_mnist"
cp /tmp/fashion_mnist/run.json /tmp/fashion_mnist/results.jsonl \
  /tmp/fashion_mnist/table.md /tmp/fashion_mnist/table.csv "$out/fashion_mnist/"
