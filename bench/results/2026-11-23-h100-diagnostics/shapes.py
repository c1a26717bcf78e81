# ruff: noqa: E731
# Measurement script used for the results in this directory (see README.md); not part of mlxd.
"""Per-process cost of first-seen prompt shapes vs seen ones, and decode rate (one env per run)."""

from __future__ import annotations

import os
import statistics
import sys
import time

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

import server  # noqa: F401

md = sys.argv[1]
pc = time.perf_counter
model, tok = load(md)
samp = make_sampler(temp=0.0)
rng_base = 1000


def toks(n: int, seed: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 150000 + 10 for i in range(n)]


def first_token(prompt: list[int], cache=None) -> float:
    t0 = pc()
    for _tok, _ in generate_step(
        mx.array(prompt), model, max_tokens=1, sampler=samp, prompt_cache=cache
    ):
        pass
    return (pc() - t0) * 1e3


def chat_like(hist: int, new: int, seed: int) -> float:
    cache = make_prompt_cache(model)
    for _ in generate_step(
        mx.array(toks(hist, seed)), model, max_tokens=1, sampler=samp, prompt_cache=cache
    ):
        pass
    mx.eval([c.state for c in cache])
    return first_token(toks(new, seed + 1), cache)


def decode(n: int = 256) -> float:
    ts = []
    t0 = pc()
    for _ in generate_step(mx.array(toks(128, 5)), model, max_tokens=n, sampler=samp):
        ts.append(pc() - t0)
    return (len(ts) - 1) / (ts[-1] - ts[0])


env = {k: v for k, v in os.environ.items() if k.startswith("MLX_")}
first_token(toks(100, 1))
first_token(toks(100, 2))
decode(32)
lens = [301, 517, 733, 949, 1165, 1381]
new = [first_token(toks(n, n)) for n in lens]
seen = [first_token(toks(n, n + 1)) for n in lens]
cnew = [chat_like(h, 540, h) for h in (1085, 1627, 2169)]
cseen = [chat_like(h, 540, h + 7) for h in (1085, 1627, 2169)]
full_new = [first_token(toks(n, n)) for n in (2711, 2713, 2717)]
full_seen = [first_token(toks(n, n + 3)) for n in (2711, 2713, 2717)]
dec = [decode() for _ in range(5)]
f = lambda xs: " ".join(f"{x:.0f}" for x in xs)
print(f"ENV {env or 'default'}")
print(f"  prefill new shapes   ms: {f(new)}   median {statistics.median(new):.1f}")
print(f"  prefill seen shapes  ms: {f(seen)}   median {statistics.median(seen):.1f}")
print(f"  chat +540 on history new: {f(cnew)}  seen: {f(cseen)}")
print(f"  full ~2712 prompt    new: {f(full_new)}  seen: {f(full_seen)}")
print(
    f"  decode 256 tok/s: {' '.join(f'{d:.1f}' for d in dec)}  median {statistics.median(dec):.1f}",
    flush=True,
)
