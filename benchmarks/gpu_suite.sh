#!/usr/bin/env bash
# The GPU checks of issues 14 and 19 in one call, for a session with one CUDA device: under 8 minutes in all (each
# step has its own timeout, so one failure does not stop the rest).
#
#   bash benchmarks/gpu_suite.sh     # -> benchmarks/results/gpu/{throughput_*.json,*.log,summary.json}
#
# 1. the CUDA tests (tests/test_cuda.py: two-stream run, snapshot ordering, zero scalar reads per steady tick);
# 2. SD-1.5-architecture UNet+VAE at 512 px (random weights: timing does not depend on them), resnet34 teacher /
#    resnet18 student at 32 px, 10 guided steps, through the engine's own loop (benchmarks/throughput.py), with
#    torch.cuda.set_sync_debug_mode("warn") over the online run: every host sync prints a warning, counted below;
# 3. the same at 256 px with the tiny guidance decoder (issue 19's cheap configuration).
# Reported: images/s, overlap efficiency = online wall / max(generation-only, training-only), MFU from FLOPs counted
# with torch's FlopCounterMode (as benchmarks/flops.py counts them) over the 989 TFLOP/s dense bf16 peak.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT_DIR:-benchmarks/results/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

echo "== CUDA tests"
timeout 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -5 || echo "== CUDA tests FAILED ($?)"

throughput() {  # NAME SECONDS FLAGS...: one benchmarks.throughput run, its stderr kept (sync warnings)
    local name=$1 seconds=$2
    shift 2
    echo "== $name: $*"
    timeout "$seconds" "$PY" -m benchmarks.throughput --steps 10 "$@" --out "$OUT/throughput_$name.json" \
        > "$OUT/$name.log" 2>&1 || echo "== $name FAILED ($?)"
    tail -3 "$OUT/$name.log"
}

throughput sd15_512 260 --sync-debug
throughput sd15_256_tiny 100 --prior-resolution 256 --guidance-decoder tiny

"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = {}
for name in ("sd15_512", "sd15_256_tiny"):
    path = out / f"throughput_{name}.json"
    if not path.exists():
        summary[name] = "not measured (failed or timed out: see the log)"
        continue
    r = json.loads(path.read_text())
    log = (out / f"{name}.log").read_text()
    summary[name] = {"images_per_s": r["ours"]["images_per_s"], "overlap_efficiency": r["ours"]["overlap_efficiency"],
                     "mfu_online": r["mfu_online"], "speedup_vs_reference": r["speedup_images_per_s"],
                     "peak_memory_gb": r["ours"].get("peak_memory_gb"),
                     # the whole online run: its set-up, last log/evaluation and final checkpoint sync by design
                     "sync_warnings_online_run": log.count("called a synchronizing CUDA operation")}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
EOF
