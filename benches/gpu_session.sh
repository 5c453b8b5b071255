#!/usr/bin/env bash
# The GPU run, on the GPU machine (an H100/H200 with PyTorch and transformers installed), from
# the repo root there, with .gpu/ made by benches/gpu_prepare.sh copied along:
#   bash benches/gpu_session.sh
# STAGES picks what runs (default "fixtures bf16", about 10 minutes; STAGES=f32 adds f32 and
# reuses the weights already made in /tmp/sigma-1024):
#   fixtures  the seven end-to-end fixture requests on the GPU vs diffusers' PNGs (seconds);
#   bf16, f32 benches/gpu_vs_diffusers.py at 1024², 20 steps in that dtype (random full-size weights).
# Writes to $OUT (default /tmp/pixart-gpu; copy it to benches/results/<gpu>/): environment.txt, fixture-parity.json,
# results-<dtype>/results.{json,md}, log.txt.
set -uo pipefail
OUT=${OUT:-/tmp/pixart-gpu}
mkdir -p "$OUT"
STAGES=${STAGES:-fixtures bf16}

main() {
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || return 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
# The CUDA libraries (cudart, cublas, curand, cudnn) come with the machine's PyTorch wheels.
LD_LIBRARY_PATH=$(python3 - <<'PY'
import glob, os, site
dirs = []
for s in site.getsitepackages():
    for p in glob.glob(os.path.join(s, "nvidia", "**", "lib*.so*"), recursive=True):
        if os.path.dirname(p) not in dirs:
            dirs.append(os.path.dirname(p))
print(":".join(dirs))
PY
)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
python3 -c 'import lzma, shutil; shutil.copyfileobj(lzma.open(".gpu/pixart.xz"), open("/tmp/pixart", "wb"))' || return 1
chmod +x /tmp/pixart
{
  echo "features: $(cat .gpu/features) commit: $(cat .gpu/commit)"
  nvidia-smi
  ldd /tmp/pixart
  python3 -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)'
} > "$OUT/environment.txt" 2>&1
if ldd /tmp/pixart | grep "not found" >/dev/null; then
  echo "gpu_session: libraries missing:"; ldd /tmp/pixart | grep "not found"; return 1
fi
status=0
for stage in $STAGES; do
  echo "== $stage $(date +%T)"
  case $stage in
    fixtures) python3 benches/gpu_fixture_parity.py --pixart /tmp/pixart --out "$OUT/fixture-parity.json" || status=1 ;;
    bf16|f32) python3 benches/gpu_vs_diffusers.py --pixart /tmp/pixart --dtypes "$stage" --model-dir /tmp/sigma-1024 \
                --out "$OUT/results-$stage" || status=1 ;;
    *) echo "gpu_session: unknown stage $stage"; status=1 ;;
  esac
done
echo "== done $(date +%T) status $status"
return $status
}

# The log is written through tee in the pipeline itself, so it is complete when the script ends.
main 2>&1 | tee "$OUT/log.txt"
