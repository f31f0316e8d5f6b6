#!/bin/bash
# Issue 24's GPU check, prepared to run once on a lent H100/H200 in at most 8 minutes (see
# /work/.library/device/README.md): copy ../shared/device/ to .device-kit/ (git-ignored), carry
# it, and run from the checkout root:   bash scripts/gpu-check.sh   (results under $OUT or ./gpu-out)
# 1. SDXL and SD3-medium at 1024², fp16, random weights: eager, compiled and graphed forwards
#    at 1 and 2 rows (scripts/gpu_forwards.py);
# 2. a 1-GPU `hybridiff run` of builtin:digits-sdxl, eager and compiled (warm-up, recompilations);
# 3. `make test` on the GPU machine (CPU workers, as in CI).
# It has not run on a GPU yet. Copy what it prints into docs/gpu-checks.md with the GPU named.
set -u
OUT=${OUT:-gpu-out}
W=$OUT/work; mkdir -p "$W"
if [ -f .device-kit/setup.sh ]; then
  bash .device-kit/setup.sh && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
export HYBRIDIFF_CACHE_DIR=$W/cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== 1) forwards, eager / compiled / graphed"
timeout 300 python3 scripts/gpu_forwards.py | tee "$OUT/forwards.md"

echo "== 2) 1-GPU run, eager and compiled"
hybridiff compile builtin:digits-sdxl --gpus 1 --cost flops --no-calibrate -o "$W/p1.json"
for mode in eager compiled; do
  hybridiff run "$W/p1.json" --prompt "a handwritten digit three" --repeats 3 --execution $mode -o "$W/run-$mode" | tail -2
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], r['status'], 'denoise_s', r['totals']['denoise_s'], r.get('compilation'))" \
    "$W/run-$mode/report.json" $mode
done

echo "== 3) make test"
timeout 1500 python3 -m pytest -q -x 2>&1 | tail -3
