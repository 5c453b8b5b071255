#!/usr/bin/env bash
# Builds the CUDA binary and packs what a GPU machine needs for benches/gpu_session.sh into
# .gpu/ (ignored by git): the compressed binary and the Python wheels a stock PyTorch image
# lacks. For a GPU machine reached by copying the repository (a build host without a GPU, a GPU
# host without a Rust toolchain); on a machine that has both, run gpu_session.sh after it there.
#
#   bash benches/gpu_prepare.sh                        (from the repo root)
#   FEATURES=cuda,cudnn bash benches/gpu_prepare.sh    (without flash attention)
#
# Variables:
#   FEATURES    cargo features of pixart-cli (default cuda,cudnn,flash-attn)
#   CARGO       the command that builds with CUDA (default: cargo; nvcc must be on PATH, or use a
#               wrapper that provides it)
#   CARGO_TARGET_DIR  where the build goes (default target-cuda, apart from the CPU build)
#   CUDNN_LIB   the folder holding libcudnn.so, for cudnn (e.g. PyPI's nvidia-cudnn-cu13:
#               python3 -c 'import nvidia.cudnn, os; print(os.path.join(nvidia.cudnn.__path__[0], "lib"))';
#               that wheel ships libcudnn.so.9 only: the script links libcudnn.so to it)
#   CUTLASS_DIR a CUTLASS git checkout, for flash-attn without network: the commit
#               candle-flash-attn pins is checked out from it where cudaforge looks
#               (~/.cudaforge/git/checkouts); without it cudaforge clones CUTLASS itself
# flash-attn's 53 kernels are kept in ~/.cache/candle-flash-attn between builds (about 3 min each
# with nvcc; CUDAFORGE_THREADS sets how many compile at once).
set -euo pipefail
FEATURES=${FEATURES:-cuda,cudnn,flash-attn}
CARGO=${CARGO:-cargo}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}
CUTLASS_COMMIT=7d49e6c7e2f8896c47f586706e67e1fb215529dc
CUTLASS=$HOME/.cudaforge/git/checkouts/cutlass-${CUTLASS_COMMIT:0:16}

if [[ $FEATURES == *cudnn* && -n ${CUDNN_LIB:-} ]]; then
  [ -e "$CUDNN_LIB/libcudnn.so" ] || ln -sf "$CUDNN_LIB/libcudnn.so.9" "$CUDNN_LIB/libcudnn.so"
  export LIBRARY_PATH=$CUDNN_LIB${LIBRARY_PATH:+:$LIBRARY_PATH}
fi
if [[ $FEATURES == *flash-attn* ]]; then
  if [ -n "${CUTLASS_DIR:-}" ] && ! git -C "$CUTLASS" rev-parse --verify -q "$CUTLASS_COMMIT^{commit}" >/dev/null 2>&1; then
    rm -rf "$CUTLASS" && mkdir -p "$(dirname "$CUTLASS")" && git clone -q "$CUTLASS_DIR" "$CUTLASS"
  fi
  if [ -d "$CUTLASS" ]; then
    [ "$(git -C "$CUTLASS" rev-parse HEAD)" = "$CUTLASS_COMMIT" ] ||
      git -C "$CUTLASS" -c advice.detachedHead=false checkout -q "$CUTLASS_COMMIT" || true
    # The kernels read include/ only.
    [ -f "$CUTLASS/include/cutlass/cutlass.h" ] || { echo "gpu_prepare: $CUTLASS has no include/cutlass" >&2; exit 1; }
  fi
  mkdir -p "$HOME/.cache/candle-flash-attn"
  export CANDLE_FLASH_ATTN_BUILD_DIR=$HOME/.cache/candle-flash-attn CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
fi
BIN=$CARGO_TARGET_DIR/release/pixart
started=$(date +%s)
"$CARGO" build --release -p pixart-cli --features "$FEATURES"
echo "gpu_prepare: built in $(( $(date +%s) - started )) s: $(stat -c %s "$BIN") bytes"

rm -rf .gpu && mkdir -p .gpu/whl
xz -T0 -9 -c "$BIN" > .gpu/pixart.xz
echo "$FEATURES" > .gpu/features
git rev-parse HEAD > .gpu/commit
# diffusers (the reference) and its one requirement the machine's image lacks, for its Python 3.12.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl diffusers==0.42.1 importlib_metadata==8.7.0 zipp==3.23.0
ls -la .gpu .gpu/whl
# What has to travel to the GPU machine: the tree git knows and .gpu/.
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -n 1 | cut -f1)
echo "gpu_prepare: $(( tree + $(du -sb .gpu | cut -f1) )) bytes to copy (the repository and .gpu/)"
