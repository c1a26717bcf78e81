#!/usr/bin/env bash
# Decode tok/s with a json_schema constraint vs without, on random-weight Qwen3-8B 4-bit.
#   bash bench/structured_gpu.sh OUT_DIR [SHAPE] [BITS]
# Needs mlx (CUDA or Metal), mlx-lm, fastapi, uvicorn, pydantic, transformers, httpx, and
# llguidance (installed from wheels/ when it is missing; no network needed). Writes
# OUT_DIR/structured.md and structured.json; the model is built under OUT_DIR/model.
set -euo pipefail
out=${1:?usage: bench/structured_gpu.sh OUT_DIR [SHAPE] [BITS]}
shape=${2:-8B}
bits=${3:-4}
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/server:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c "import llguidance" 2>/dev/null; then
  "$py" -m pip install --quiet --no-index --no-deps wheels/llguidance-*.whl
fi
mkdir -p "$out"
model="$out/model-qwen3-$shape-${bits}bit"
[ -f "$model/config.json" ] || "$py" -m tools.random_model --shape "$shape" --bits "$bits" --out "$model"
# Random weights: EOS suppressed so every plain request runs to max_tokens too.
"$py" -m mlxd.bench.structured --model-dir "$model" --out "$out" --repeats "${REPEATS:-6}" \
  --max-tokens "${MAX_TOKENS:-256}" --suppress-eos
