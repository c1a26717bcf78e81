#!/usr/bin/env bash
# The memory scenario of issue 10 on a GPU box, one command:
#
#     bench/gpu_memory.sh OUTDIR
#
# Builds random-weight Qwen3 models in the real shapes (8B 4-bit, 0.6B 4-bit, 0.6B bf16), then
# for each: calibration + estimate vs measured peak at LENGTHS prompt tokens (32 generated),
# then the length stress of the 8B 4-bit under a BUDGET memory budget, TTFT beside the same
# requests without a budget. Needs only what serving needs (mlx, mlx-lm, fastapi, uvicorn,
# pydantic, sse-starlette, transformers, httpx, numpy, psutil) and no network.
#
# Each part can run on its own (the device gives 10 minutes a command):
#     PARTS=build bench/gpu_memory.sh OUT; PARTS=estimate ...; PARTS=stress ...
# Results: OUTDIR/<model>/memory.md (+ memory.jsonl, meta.json), OUTDIR/stress-qwen3-8b-4bit/,
# and OUTDIR/SUMMARY.md with every table.
set -euo pipefail

OUT=$(realpath -m "${1:?usage: bench/gpu_memory.sh OUTDIR}")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PARTS=${PARTS:-build,estimate,stress}
LENGTHS=${LENGTHS:-512,2048,8192,16384,32768}
STRESS=${STRESS:-512,1024,2048,2872,4096,8192,11484,16384,23000}
BUDGET=${BUDGET:-9GB}
MODELS=${MODELS:-qwen3-8b-4bit qwen3-0.6b-4bit qwen3-0.6b-bf16}
mkdir -p "$OUT/models"

has() { [[ ",$PARTS," == *",$1,"* ]]; }

build() {
  local name=$1; shift
  if [ ! -f "$OUT/models/$name/config.json" ]; then
    "$PY" -m server random-model --out "$OUT/models/$name" "$@"
  fi
}

if has build; then
  build qwen3-8b-4bit --shape 8B --bits 4 --dtype bfloat16
  build qwen3-0.6b-4bit --shape 0.6B --bits 4 --dtype bfloat16
  build qwen3-0.6b-bf16 --shape 0.6B --dtype bfloat16
  (nvidia-smi || true) > "$OUT/nvidia-smi.txt" 2>&1
fi

if has estimate; then
  for m in $MODELS; do
    # The calibration is stored under OUT/home and reused by the stress servers below.
    "$PY" -m server.bench.memory --model-dir "$OUT/models/$m" --out "$OUT/$m" \
      --home "$OUT/home" --lengths "$LENGTHS" --max-tokens 32 2>&1 | tee "$OUT/$m.log"
  done
fi

if has stress; then
  "$PY" -m server.bench.memory --model-dir "$OUT/models/qwen3-8b-4bit" \
    --out "$OUT/stress-qwen3-8b-4bit" --home "$OUT/home" \
    --stress "$STRESS" --budget "$BUDGET" 2>&1 | tee "$OUT/stress.log"
fi

cat "$OUT"/*/memory.md > "$OUT/SUMMARY.md" 2>/dev/null || true
echo "tables: $OUT/SUMMARY.md"
