#!/usr/bin/env bash
# Prepares one run on a lent GPU machine (H100/H200), here, without a GPU: cross-builds the CUDA
# binary, compresses it, and downloads the Python wheels that machine lacks, into .gpu/ (ignored
# by git; the device tool carries it). Then, with the device tool:
#   run(command="bash benches/gpu_session.sh", carry=[".gpu"], timeout_s=600)
#
#   bash benches/gpu_prepare.sh                    (from the repo root)
#   FEATURES=cuda,cudnn bash benches/gpu_prepare.sh   (without flash attention)
#
# FEATURES defaults to cuda,cudnn,flash-attn. cudnn needs PyPI's nvidia-cudnn-cu13 in the
# cross-build's venv and a libcudnn.so link beside its other link-time libraries (done here:
# ../shared/tools/cuda-xbuild.sh does not). flash-attn needs CUTLASS at the commit
# candle-flash-attn pins, offline: a clone of a mirror checked out in ~/.cudaforge (see README,
# "GPU builds"); its 53 kernels are kept in ~/.cache/candle-flash-attn between builds.
set -euo pipefail
FEATURES=${FEATURES:-cuda,cudnn,flash-attn}
XBUILD=${XBUILD:-../shared/tools/cuda-xbuild.sh}
H=${CUDA_XBUILD_HOME:-$HOME/.cache/cuda-xbuild}
CUTLASS_COMMIT=7d49e6c7e2f8896c47f586706e67e1fb215529dc
CUTLASS=$HOME/.cudaforge/git/checkouts/cutlass-${CUTLASS_COMMIT:0:16}

"$XBUILD" --version >/dev/null   # the cross-build's venv and link folder exist after this
if [[ $FEATURES == *cudnn* ]]; then
  py=$H/venv/bin/python
  "$py" -c 'import nvidia.cudnn' 2>/dev/null || "$py" -m pip install -q --no-deps nvidia-cudnn-cu13
  cudnn=$("$py" -c 'import nvidia.cudnn, os; print(os.path.join(list(nvidia.cudnn.__path__)[0], "lib", "libcudnn.so.9"))')
  for lib in "$H"/link/*/lib; do ln -sf "$cudnn" "$lib/libcudnn.so"; done
fi
if [[ $FEATURES == *flash-attn* ]]; then
  if ! git -C "$CUTLASS" rev-parse --verify -q "$CUTLASS_COMMIT^{commit}" >/dev/null 2>&1; then
    mirror=/work/.mirror/NVIDIA+cutlass/repo
    [ -d "$mirror" ] || { echo "gpu_prepare: no CUTLASS at $CUTLASS and no mirror at $mirror (the library's fetch github:NVIDIA/cutlass makes one)" >&2; exit 1; }
    rm -rf "$CUTLASS" && git clone -q "$mirror" "$CUTLASS"
  fi
  # (The mirror lacks one media PNG; include/ is complete, which is all the kernels read.)
  [ "$(git -C "$CUTLASS" rev-parse HEAD)" = "$CUTLASS_COMMIT" ] ||
    git -C "$CUTLASS" -c advice.detachedHead=false checkout -q "$CUTLASS_COMMIT" || true
  [ -f "$CUTLASS/include/cutlass/cutlass.h" ] || { echo "gpu_prepare: $CUTLASS has no include/cutlass" >&2; exit 1; }
  mkdir -p "$HOME/.cache/candle-flash-attn"
  export CANDLE_FLASH_ATTN_BUILD_DIR=$HOME/.cache/candle-flash-attn CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
fi
BIN=${CARGO_TARGET_DIR:-target-cuda}/release/pixart
started=$(date +%s)
"$XBUILD" build --release -p pixart-cli --features "$FEATURES"
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
# The device tool carries the tracked tree, untracked files and .gpu: at most 64 MiB in all.
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -n 1 | cut -f1)
total=$(( tree + $(du -sb .gpu | cut -f1) ))
echo "gpu_prepare: $total bytes would travel (limit 67108864)"
[ "$total" -lt $(( 62 * 1024 * 1024 )) ] || { echo "gpu_prepare: too large to carry" >&2; exit 1; }
