#!/usr/bin/env bash
# One call on a lent GPU machine, from the repo root there, with .gpu/ made by
# benches/gpu_prepare.sh carried along (device tool):
#   run(command="bash benches/gpu_session.sh", carry=[".gpu"], timeout_s=600)
# STAGES picks what runs (default "fixtures bf16": one 10-minute call; then STAGES=f32 in a
# second call, within 30 s so the machine is still warm and /tmp/sigma-1024 is reused):
#   fixtures  the seven end-to-end fixture requests on the GPU vs diffusers' PNGs (seconds);
#   bf16, f32 benches/gpu_vs_diffusers.py at 1024², 20 steps in that dtype (random full-size weights).
# Writes to $OUT (what the device tool brings back): environment.txt, fixture-parity.json,
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
