#!/usr/bin/env bash
# The memory scenario of issue 10 on a GPU box, one command:
#
#     PYTHONPATH=/tmp/site:$PWD bench/gpu_memory.sh OUTDIR
#
# Builds random-weight Qwen3 models in the real shapes (8B 4-bit, 0.6B 4-bit, 0.6B bf16) in a
# scratch dir (WORK, default /tmp/mlxd-gpu-memory: never under OUTDIR), then for each:
# calibration + estimate vs measured peak at LENGTHS prompt tokens (32 generated); then the
# length stress of the 8B 4-bit under a BUDGET memory budget, TTFT beside the same requests
# without a budget. Needs only what serving needs (mlx, mlx-lm, fastapi, uvicorn, pydantic,
# sse-starlette, transformers, httpx, numpy, psutil) and no network.
#
# OUTDIR receives few files: SUMMARY.md (every table, the calibrations' samples), rows.jsonl
# (one object per row), meta.json (machine, versions, nvidia-smi) and run.log. About 6-8 min on
# an H200; to split it across calls: PARTS=estimate ... then PARTS=stress ... (same WORK, the
# models and calibrations are reused).
set -euo pipefail

OUT=$(realpath -m "${1:?usage: bench/gpu_memory.sh OUTDIR}")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/server:$PWD"
export PYTHONUNBUFFERED=1
WORK=${WORK:-/tmp/mlxd-gpu-memory}
PARTS=${PARTS:-estimate,stress}
LENGTHS=${LENGTHS:-512,2048,8192,16384,32768}
STRESS=${STRESS:-512,1024,2048,2872,4096,8192,11484,16384,23000}
BUDGET=${BUDGET:-9GB}
MODELS=${MODELS:-qwen3-8b-4bit qwen3-0.6b-4bit qwen3-0.6b-bf16}
mkdir -p "$OUT" "$WORK/models"
exec > >(tee -a "$OUT/run.log") 2>&1

has() { [[ ",$PARTS," == *",$1,"* ]]; }

build() {
  local name=$1; shift
  [ -f "$WORK/models/$name/config.json" ] || "$PY" -m tools.random_model --out "$WORK/models/$name" "$@"
}
build qwen3-8b-4bit --shape 8B --bits 4 --dtype bfloat16
if has estimate; then
  build qwen3-0.6b-4bit --shape 0.6B --bits 4 --dtype bfloat16
  build qwen3-0.6b-bf16 --shape 0.6B --dtype bfloat16
  for m in $MODELS; do
    # The calibration is stored under WORK/home and reused by the stress servers below.
    "$PY" -m mlxd.bench.memory --model-dir "$WORK/models/$m" --out "$WORK/$m" \
      --home "$WORK/home" --lengths "$LENGTHS" --max-tokens 32
  done
fi
if has stress; then
  "$PY" -m mlxd.bench.memory --model-dir "$WORK/models/qwen3-8b-4bit" \
    --out "$WORK/stress-qwen3-8b-4bit" --home "$WORK/home" --stress "$STRESS" --budget "$BUDGET"
fi

{
  for d in "$WORK"/*/; do [ -f "$d/memory.md" ] && cat "$d/memory.md"; done
  echo "## Calibrations (samples: phase, chunk tokens, keys, bytes held)"
  for f in "$WORK"/home/calibration/*.json; do echo; echo "$(basename "$f")"; cat "$f"; done
} > "$OUT/SUMMARY.md"
cat "$WORK"/*/memory.jsonl > "$OUT/rows.jsonl" 2>/dev/null || true
"$PY" - "$OUT/meta.json" "$WORK" <<'PYEOF'
import json, pathlib, shutil, subprocess, sys
metas = {p.parent.name: json.loads(p.read_text()) for p in pathlib.Path(sys.argv[2]).glob("*/meta.json")}
smi = shutil.which("nvidia-smi")
smi = subprocess.run([smi], capture_output=True, text=True, check=False).stdout if smi else None
pathlib.Path(sys.argv[1]).write_text(json.dumps({"runs": metas, "nvidia_smi": smi}, indent=1))
PYEOF
echo "tables: $OUT/SUMMARY.md"
