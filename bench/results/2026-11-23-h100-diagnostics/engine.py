# ruff: noqa: E501, B007, B905, RUF007
# Measurement script used for the results in this directory (see README.md); not part of mlxd.
"""Engine vs mlx-lm in-process: where does decode time and TTFT go (no HTTP)."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler

import server  # noqa: F401  (backend setup before mlx)
from server.bench.runner import PromptBook
from server.engine import GenerationRequest, MLXEngine, SamplingParams

model_dir = Path(sys.argv[1])
N = int(sys.argv[2]) if len(sys.argv) > 2 else 256
REP = 3
pc = time.perf_counter
model, tok = load(str(model_dir))
book = PromptBook(tok)
bias = {int(t): -100.0 for t in tok.eos_token_ids}
print("device", mx.default_device(), "switchinterval", sys.getswitchinterval(), flush=True)


def prompt(nonce: str, short: bool = False) -> list[int]:
    return list(tok.apply_chat_template(book.long_output(nonce), add_generation_prompt=True))


def rate(ts: list[float]) -> float:
    return (len(ts) - 1) / (ts[-1] - ts[0])


def gaps(ts: list[float]) -> tuple[float, float]:
    g = sorted(b - a for a, b in zip(ts, ts[1:]))
    return g[len(g) // 2] * 1e3, g[int(len(g) * 0.95)] * 1e3


def show(name: str, runs: list[tuple[float, list[float]]]) -> None:
    ttft = statistics.median(r[0] for r in runs) * 1e3
    tps = statistics.median(rate(r[1]) for r in runs)
    p50, p95 = gaps([t for r in runs[-1:] for t in r[1]])
    print(
        f"{name:42s} TTFT {ttft:7.1f} ms  decode {tps:7.1f} tok/s  gap p50 {p50:.2f} p95 {p95:.2f} ms",
        flush=True,
    )


def mk():
    return make_sampler(temp=0.0), make_logits_processors(logit_bias=bias)


def sg(nonce: str, n: int) -> tuple[float, list[float]]:
    s, lp = mk()
    t0 = pc()
    p = prompt(nonce)
    ts = [
        pc() - t0
        for _ in stream_generate(model, tok, p, max_tokens=n, sampler=s, logits_processors=lp)
    ]
    return ts[0], ts


def gs(nonce: str, n: int) -> tuple[float, list[float]]:
    s, lp = mk()
    p = prompt(nonce)
    t0 = pc()
    ts = []
    for tk, _ in generate_step(mx.array(p), model, max_tokens=n, sampler=s, logits_processors=lp):
        ts.append(pc() - t0)
    return ts[0], ts


sg("warmup", 32)
for n, label in ((N, "decode"), (16, "warm")):
    show(f"mlx_lm.stream_generate {label} {n}", [sg(f"sg-{label}-{i}", n) for i in range(REP)])
    show(f"mlx_lm generate_step {label} {n}", [gs(f"gs-{label}-{i}", n) for i in range(REP)])


class Rec:
    """A detokenizer proxy: records when the MLX thread handles each token."""

    def __init__(self, inner):
        self.inner, self.times = inner, []

    def add_token(self, t):
        self.times.append(pc())
        self.inner.add_token(t)

    def __getattr__(self, k):
        return getattr(self.inner, k)


class Tok:
    def __init__(self, inner):
        self.inner, self.detokenizer = inner, Rec(inner.detokenizer)

    def __getattr__(self, k):
        return getattr(self.inner, k)


async def engine_main() -> None:
    eng = MLXEngine(prefix_cache_bytes=0)
    await eng.load(model_dir)

    async def one(nonce: str, n: int, busy: bool = False):
        wt = Tok(tok)
        req = GenerationRequest(
            prompt=prompt(nonce),
            max_tokens=n,
            sampling=SamplingParams(temperature=0.0, logit_bias=bias),
            tokenizer=wt,
        )
        t0 = pc()
        ts = []
        async for ch in eng.generate(req):
            if ch.token is not None:
                ts.append(pc() - t0)
            if busy:  # simulate per-token serialisation work on the event loop
                import json

                for _ in range(20):
                    json.dumps({"choices": [{"delta": {"content": ch.text}}]})
        worker = [t - t0 for t in wt.detokenizer.times]
        return ts, worker

    await one("e-warm", 32)
    for n, label in ((N, "decode"), (16, "warm")):
        runs = [await one(f"e-{label}-{i}", n) for i in range(REP)]
        show(f"MLXEngine (asyncio side) {label} {n}", [(r[0][0], r[0]) for r in runs])
        show(f"MLXEngine (MLX thread) {label} {n}", [(r[1][0], r[1]) for r in runs])
        lag = [a - w for r in runs for a, w in zip(r[0], r[1])]
        print(
            f"  thread->asyncio lag median {statistics.median(lag) * 1e3:.3f} ms max {max(lag) * 1e3:.3f} ms"
        )
    runs = [await one(f"e-busy-{i}", N, busy=True) for i in range(REP)]
    show(f"MLXEngine busy loop (asyncio side) {N}", [(r[0][0], r[0]) for r in runs])
    eng.close()


asyncio.run(engine_main())
