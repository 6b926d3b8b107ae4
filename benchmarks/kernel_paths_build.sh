#!/usr/bin/env bash
# Every chapter from nothing on one CPU kernel path, beside the native build (for benchmarks/kernel_paths.py).
# Usage: benchmarks/kernel_paths_build.sh DATA_DIR OUT_DIR [ATEN_CPU_CAPABILITY, default: default]
# DATA_DIR gets a link to data/benchmark and fresh features; OUT_DIR the executed notebooks and results/*.json
# (`-p seed 0`, the default, sends results there instead of results/).
set -euo pipefail
cd "$(dirname "$0")/.."
data=$(realpath -m "$1") out=$(realpath -m "$2")
mkdir -p "$data" "$out"
ln -sfn "$PWD/data/benchmark" "$data/benchmark"
export ATEN_CPU_CAPABILITY="${3:-default}" VRP_DATA_DIR="$data"
start=$(date +%s)
.venv/bin/python -m vrp_utils.extract.features --jobs 2 --sample-pool 20 --temperature 0.7 --top-p 0.9 --sample-seed 0 \
  --out "$data/features" >/dev/null
for nb in 00_benchmark_and_zoo 01_attention 02_masking 03_probes 04_self_consistency 05_leaderboard; do
  .venv/bin/python -m vrp_utils.run "$nb" -p seed 0 --output-dir "$out" --no-progress
done
echo "kernel path $ATEN_CPU_CAPABILITY: built in $(( $(date +%s) - start )) s -> $out"
