#!/usr/bin/env bash
# Every CPU figure the README's CPU section quotes, measured on this machine in one session, into
# benches/results/cpu-<model>-<N>core/ (named from lscpu's model name and the core count):
#
#   1. benches/cpu_vs_diffusers.py: pixart vs diffusers side by side (f32 and bf16: step, VAE,
#      whole process, peak RSS, PNG difference) -> results.json, results.md;
#   2. benches/cpu_bench_matrix.py: `pixart bench` per --dtype (f32, bf16, f16) and per SIMD level
#      of our kernels (detected, avx2, baseline) -> bench-matrix.json, bench-matrix.md;
#   3. where `perf` may record: where a transformer step's time goes -> step-profile.txt;
#   4. with T5_XXL_DIR set: the T5 XXL encoder per storage type (writes a 9.5 GB random GGUF there
#      once; about 15 minutes) -> benches/results/t5-xxl-<same name>/.
#
# Usage, from anywhere, with the pinned reference stack (tests/reference/requirements.txt) in a
# virtualenv:
#
#   PYTHON=/path/to/venv/bin/python bash benches/cpu_session.sh [results-name]
#
# Variables: PYTHON (default python3), MODEL_DIR (where the random model is kept between
# sessions; default a temporary folder), T5_XXL_DIR (see 4). Run nothing else meanwhile: the
# figures are timings.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
cpu=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)
cores=$(nproc)
slug=$(printf '%s' "$cpu" | tr '[:upper:]' '[:lower:]' | sed -E 's/\((r|tm)\)//g; s/ (cpu|processor)//g; s/@.*//; s/[^a-z0-9]+/-/g; s/^-+|-+$//g')
name=${1:-cpu-${slug}-${cores}core}
out=benches/results/$name
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
model=${MODEL_DIR:-$scratch/pixart-sigma-cpu-random}
mkdir -p "$out"
echo "== $cpu, $cores cores -> $out"
lscpu > "$out/lscpu.txt"

cargo build --release --locked -p pixart-cli --bin pixart
pixart=target/release/pixart

echo "== 1. side by side with diffusers"
"$python" benches/cpu_vs_diffusers.py --pixart "$pixart" --model-dir "$model" --out "$out"

echo "== 2. dtypes and SIMD levels"
"$python" benches/cpu_bench_matrix.py --pixart "$pixart" --model-dir "$model" --out "$out"

echo "== 3. step profile"
if command -v perf >/dev/null && perf record -q -o "$scratch/probe.data" -- true >/dev/null 2>&1; then
  "$pixart" bench --model "$model" --device cpu --dtype f32 --no-safety-checker --size 512x512 \
    --steps 40 --runs 1 --warmup 0 >"$scratch/bench.log" 2>&1 &
  bench=$!
  sleep 3 # past loading and the text encoder: the samples are denoising steps
  perf record -q -F 999 -p "$bench" -o "$scratch/step.data" -- sleep 8 >/dev/null 2>&1 || true
  wait "$bench"
  {
    echo "perf record -F 999 -p <pid> -- sleep 8, 3 s into: $pixart bench --model <model> --dtype f32 --steps 40 (denoising only)"
    echo "$cpu, $cores cores"
    perf report -i "$scratch/step.data" --no-children --sort symbol --stdio 2>/dev/null |
      awk '/^ +[0-9]/ && n < 30 { print; n++ }'
  } >"$out/step-profile.txt"
  cat "$out/step-profile.txt"
else
  echo "perf is missing or may not record here (kernel.perf_event_paranoid): no step profile"
fi

if [[ -n "${T5_XXL_DIR:-}" ]]; then
  echo "== 4. T5 XXL per storage type"
  cargo bench --locked --bench t5_xxl -- --dir "$T5_XXL_DIR" --out "benches/results/t5-xxl-$name"
fi
echo "== done: $out"
