#!/bin/bash
# Issue 12's GPU checks, run once on a lent GPU machine (see /work/.library/device/README.md):
#   bash scripts/gpu-reliability.sh      (from the checkout root; results under $OUT or ./gpu-out)
# 1. a 2-worker plan on a 1-GPU machine is refused before any worker starts;
# 2. torchrun starting 2 ranks on 1 GPU: each rank says so in one line, no traceback from us;
# 3. the same plan on CPU workers of the GPU machine completes;
# 4. a 1-GPU plan runs on CUDA (NCCL over the file store), then SIGINT mid-run: exit 130,
#    report 'interrupted', the finished images on disk; nothing listens outside loopback.
set -u
OUT=${OUT:-gpu-out}
W=$OUT/work; mkdir -p "$W"
if [ -f .device-kit/setup.sh ]; then
  bash .device-kit/setup.sh && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
export HYBRIDIFF_TIMEOUT_S=60
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
PROMPT="a handwritten digit three"
status() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('report:', r['status'], len(r['images']), 'images', r.get('error', ''), r.get('device'))" "$1"; }

echo "== compile 2-device and 1-device plans"
hybridiff compile builtin:digits-sdxl --gpus 2 --mesh dp=1,cfg=2,pp=1 --cost flops --no-calibrate -o "$W/p2.json"
hybridiff compile builtin:digits-sdxl --gpus 1 --cost flops --no-calibrate -o "$W/p1.json"

echo "== 1) hybridiff run, 2 workers, 1 GPU"
hybridiff run "$W/p2.json" --prompt "$PROMPT" -o "$W/o1"; echo "exit $?"; ls "$W/o1" 2>&1 | head -3

echo "== 2) torchrun, 2 ranks, 1 GPU"
timeout 180 python3 -m torch.distributed.run --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29511 \
  -m hybridiff run "$W/p2.json" --prompt "$PROMPT" -o "$W/o2" > "$W/torchrun.out" 2> "$W/torchrun.err"
echo "exit $?"; echo "our error lines:"; grep "^error" "$W/torchrun.err"
echo "tracebacks from hybridiff frames: $(grep -c 'hybridiff/' "$W/torchrun.err")"

echo "== 3) the 2-worker plan on CPU workers"
hybridiff run "$W/p2.json" --prompt "$PROMPT" --device cpu --threads 4 -o "$W/o3"; echo "exit $?"; status "$W/o3/report.json"

echo "== 4) 1-GPU plan on CUDA, SIGINT mid-run"
hybridiff run "$W/p1.json" --prompt "$PROMPT" -o "$W/o4a"; echo "exit $?"; status "$W/o4a/report.json"
hybridiff run "$W/p1.json" --prompt "$PROMPT" --num-images-per-prompt 400 --steps 50 -o "$W/o4" 2> "$W/sigint.err" &
pid=$!
for _ in $(seq 600); do
  python3 -c "import json,sys; sys.exit(0 if json.load(open('$W/o4/report.json'))['images'] else 1)" 2>/dev/null && break
  sleep 0.1
done
echo "listening sockets of the run:"; ss -ltnp 2>/dev/null | grep -E "pid=($pid|$(pgrep -d'|' -P $pid))," || echo "(none)"
start=$(date +%s.%N); kill -INT $pid; wait $pid; code=$?
echo "exit $code after $(python3 -c "print(round($(date +%s.%N) - $start, 2))") s"; cat "$W/sigint.err" | grep -v Warning
status "$W/o4/report.json"; echo "images on disk: $(ls "$W/o4" | grep -c png)"; ls -a "$W/o4" | grep -c '\.tmp$'
