"""Decode speed with a ``json_schema`` constraint against without, in the same run.

``python -m mlxd.bench.structured --model-dir DIR --out OUT`` starts mlxd on the model (or
uses ``--url``), then sends pairs of streamed greedy requests, plain and with
``response_format: json_schema``, alternating so that drift in the machine's speed hits both
alike. The schema (a long list of small records: strings, bounded integers, enum arrays) keeps
the grammar busy on structure, not just inside one long string, and ``minItems`` keeps the JSON
open for the whole budget, so both requests decode ``--max-tokens`` tokens. Writes
``structured.md`` (the table, with the ratio) and ``structured.json`` into OUT.

Only httpx is needed on the client side (no openai SDK), so it runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlxd.bench.meta import machine_info, versions
from mlxd.bench.runner import PromptBook
from mlxd.bench.session import mlxd_config
from mlxd.bench.targets import HttpTarget, SpawnedServer, list_models, server_env
from mlxd.localnet import free_port

RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
}
SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "items": RECORD, "minItems": 200}},
    "required": ["people"],
}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "people", "schema": SCHEMA, "strict": True},
}


def measure(url: str, model: str, tokenizer: Any, repeats: int, max_tokens: int,
            suppress_eos: bool) -> dict[str, Any]:  # fmt: skip
    extra: dict[str, Any] = {}
    if suppress_eos:
        # Random weights: every request runs to max_tokens, and whitespace-only tokens are
        # pushed down too (on both sides), since a random model may otherwise write nothing but
        # newlines, which a server holds back until the end (no stream to time).
        bias = {t: -100 for t in tokenizer.eos_token_ids}
        vocab = tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else len(tokenizer.vocab)
        for t in range(vocab):
            if not tokenizer.decode([t]).strip():
                bias[t] = -100
        extra["logit_bias"] = {str(t): v for t, v in bias.items()}
    plain = HttpTarget("plain", url, model, timeout=600, extra_body=extra)
    constrained = HttpTarget(
        "json_schema", url, model, timeout=600,
        extra_body={**extra, "response_format": RESPONSE_FORMAT},
    )  # fmt: skip
    book = PromptBook(tokenizer)
    rows: dict[str, list[dict[str, Any]]] = {"plain": [], "json_schema": []}
    # One unmeasured pair first: compiles kernels and builds the grammar's tokenizer view.
    for target in (plain, constrained):
        target.chat(book.long_output("warm-up"), 8)
    for r in range(repeats):
        for target in (plain, constrained) if r % 2 == 0 else (constrained, plain):
            result = target.chat(book.long_output(f"structured-{r}"), max_tokens)
            row = {"repeat": r, "decode_tps": result.decode_tps, "ttft_s": result.ttft,
                   "completion_tokens": result.completion_tokens,
                   "finish_reason": result.finish_reason}  # fmt: skip
            if target is constrained:
                row["json_prefix_ok"] = result.text.startswith('{"people": [')
            rows[target.name].append(row)
            print(f"{target.name} #{r + 1}: {row}", flush=True)
    medians = {
        name: statistics.median(x["decode_tps"] for x in rs if x["decode_tps"])
        for name, rs in rows.items()
    }
    return {"rows": rows, "median_decode_tps": medians,
            "ratio": medians["json_schema"] / medians["plain"]}  # fmt: skip


def table(result: dict[str, Any], meta: dict[str, Any]) -> str:
    m = result["median_decode_tps"]
    tokens = [x["completion_tokens"] for x in result["rows"]["json_schema"]]
    return (
        f"# Decode with a json_schema constraint vs without\n\n"
        f"{meta['machine']}; model {meta['model']}; {meta['repeats']} alternating pairs of "
        f"{meta['max_tokens']}-token greedy streamed requests; mlx {meta['versions'].get('mlx')}, "
        f"llguidance {meta['llguidance']}.\n\n"
        "| | decode tok/s (median) | ratio |\n|---|---|---|\n"
        f"| unconstrained | {m['plain']:.1f} | 1.00 |\n"
        f"| json_schema | {m['json_schema']:.1f} | {result['ratio']:.2f} |\n\n"
        f"Constrained completion tokens per request: {tokens}.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlxd.bench.structured")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--url", help="a running mlxd (…/v1); default: start one")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--suppress-eos", action="store_true")
    args = parser.parse_args(argv)
    from importlib.metadata import version

    from mlx_lm.utils import load_tokenizer

    from mlxd.backend import blas_in_use

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.model_dir)
    spawned = None
    url = args.url
    if url is None:
        config = args.out / "models.yaml"
        config.write_text(mlxd_config(args.model_dir), encoding="utf-8")
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1"
        argv_ = [sys.executable, "-m", "mlxd", "serve", "--config", str(config),
                 "--port", str(port), "--preload"]  # fmt: skip
        spawned = SpawnedServer("mlxd", argv_, url, args.out / "mlxd.log",
                                server_env(blas_in_use(), os.environ))  # fmt: skip
        spawned.launch()
        spawned.wait_ready(600)
    try:
        model = list_models(url)[0]
        result = measure(url, model, tokenizer, args.repeats, args.max_tokens, args.suppress_eos)
    finally:
        if spawned is not None:
            spawned.stop()
    machine = machine_info()
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine.get("gpu") or machine.get("cpu"),
        "model": args.model_dir.name,
        "repeats": args.repeats,
        "max_tokens": args.max_tokens,
        "versions": versions(),
        "llguidance": version("llguidance"),
        "schema": SCHEMA,
    }
    (args.out / "structured.json").write_text(
        json.dumps({"meta": meta, **result}, indent=2) + "\n", encoding="utf-8"
    )
    text = table(result, meta)
    (args.out / "structured.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"done in {time.perf_counter() - start:.0f} s")
    sys.exit(code)
