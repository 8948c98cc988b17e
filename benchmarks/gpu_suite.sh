#!/usr/bin/env bash
# Issue 19's GPU wall-clock checks in one script, for a session with one CUDA device (about 10 minutes on an
# H100/H200; every step has its own timeout, so one failure does not stop the rest):
#
#   bash benchmarks/gpu_suite.sh     # -> benchmarks/results/gpu/throughput_*.json and gpu/run-default/
#
# SD-1.5-architecture UNet+VAE (random weights: timing does not depend on them), resnet34 teacher / resnet18 student
# at 32 px, 10 guided steps, reference-style (batch 1, fp16, generation then training) against ours; then the default
# world through the engine itself (metrics.jsonl: images_per_s). The counted FLOPs of the same configurations are in
# benchmarks/results/flops.json (python -m benchmarks.flops), so MFU = counted FLOP/s / 989 TFLOP/s.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT_DIR:-benchmarks/results/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

throughput() {  # NAME FLAGS...: one benchmarks.throughput run
    local name=$1
    shift
    echo "== $name: $*"
    timeout 300 "$PY" -m benchmarks.throughput --steps 10 "$@" --out "$OUT/throughput_$name.json" \
        || echo "== $name FAILED ($?)"
}

throughput sd15_512                                       # bf16 frozen weights, channels_last (the defaults now)
throughput sd15_512_nchw --no-channels-last               # channels_last off: does it pay?
throughput sd15_512_tiny --guidance-decoder tiny          # TAESD-architecture guidance decoder
throughput sd15_256_tiny --prior-resolution 256 --guidance-decoder tiny
throughput sd15_256_tiny_compile --prior-resolution 256 --guidance-decoder tiny --compile   # compile: does it pay?

echo "== default world (the engine itself, 500 images, 500 student steps)"
timeout 300 "$PY" -m engine.run --run-dir "$OUT/run-default" --overwrite --images 500 --student-steps 500 \
    || echo "== default world FAILED ($?)"
