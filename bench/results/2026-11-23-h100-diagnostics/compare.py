# ruff: noqa: E501, E402, B905
# Measurement script used for the results in this directory (see README.md); not part of mlxd.
"""Interleaved single-stream comparison: in-process mlx-lm, MLXEngine direct, mlxd HTTP, mlx_lm.server.

All prompts have exactly the same token count, shapes are warmed first, and targets take turns
each round (rotating order), so slow drift of the machine hits every target alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import server  # noqa: F401
from server.bench import _free_port, mlxd_config
from server.bench.report import StreamResult
from server.bench.runner import PromptBook
from server.bench.targets import (
    HttpTarget,
    InProcessTarget,
    SpawnedServer,
    list_models,
    resolve_model_name,
)

md = Path(sys.argv[1])
ROUNDS = int(sys.argv[2])
out = Path(sys.argv[3])
with_engine = sys.argv[4] == "1"
L, NDEC, NTTFT = 128, 256, 8
out.mkdir(parents=True, exist_ok=True)
pc = time.perf_counter


def spawn(name: str, argv: list[str]) -> SpawnedServer:
    port = _free_port()
    argv = [a.format(port=port, config=str(out / "models.yaml"), model_dir=str(md)) for a in argv]
    s = SpawnedServer(
        name, argv, f"http://127.0.0.1:{port}/v1", out / f"{name}.log", dict(os.environ)
    )
    s.launch()
    return s


(out / "models.yaml").write_text(mlxd_config(md))
import atexit

py = sys.executable
servers = [
    spawn(
        "mlxd",
        [py, "-m", "server", "serve", "--config", "{config}", "--port", "{port}", "--preload"],
    ),
    spawn(
        "mlx_lm.server", [py, "-m", "mlx_lm.server", "--model", "{model_dir}", "--port", "{port}"]
    ),
]
for _s in servers:
    atexit.register(_s.stop)
inproc = InProcessTarget(md, suppress_eos=True)
inproc.load()
tok = inproc.tokenizer
book = PromptBook(tok)
bias = {int(t): -100.0 for t in tok.eos_token_ids}


class EngineTarget:
    name = "engine"

    def __init__(self) -> None:
        from server.engine import MLXEngine

        self.eng = MLXEngine()
        asyncio.run(self.eng.load(md))

    def chat(self, messages, n, conversation=False) -> StreamResult:
        from server.engine import GenerationRequest, SamplingParams

        async def go() -> StreamResult:
            t0 = pc()
            prompt = list(
                tok.encode(
                    tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False,
                )
            )
            req = GenerationRequest(
                prompt=prompt,
                max_tokens=n,
                tokenizer=tok,
                sampling=SamplingParams(temperature=0.0, logit_bias=bias),
            )
            r = StreamResult()
            async for ch in self.eng.generate(req):
                if ch.text:
                    r.token_times.append(pc() - t0)
                if ch.finish_reason:
                    r.usage_completion_tokens = ch.completion_tokens
                    r.finish_time = pc() - t0
            return r

        return asyncio.run(go())


targets: dict[str, object] = {"in-process": inproc}
if with_engine:
    targets["engine"] = EngineTarget()
extra = {"logit_bias": {str(t): -100 for t in tok.eos_token_ids}}
for s in servers:
    s.wait_ready(300)
    model = resolve_model_name(list_models(s.base_url), md)
    targets[s.name] = HttpTarget(s.name, s.base_url, model, timeout=120, extra_body=extra)
print("ready:", list(targets), flush=True)

counter = 0


def exact(tag: str) -> list[dict[str, str]]:
    global counter
    while True:
        counter += 1
        m = book.sized(f"{tag}-{counter}", L)
        if book.count(m) == L:
            return m


names = list(targets)
raw: dict[str, dict[str, list[float]]] = {n: {"ttft": [], "tps": []} for n in names}
for rnd in range(-2, ROUNDS):
    order = names[rnd % len(names) :] + names[: rnd % len(names)]
    for n in order:
        t = targets[n]
        a = t.chat(exact("t"), NTTFT)
        b = t.chat(exact("d"), NDEC)
        if rnd >= 0:
            raw[n]["ttft"].append(a.ttft * 1e3)
            raw[n]["tps"].append(b.decode_tps or float("nan"))
            if b.decode_tps is None:
                print(
                    n,
                    "no decode rate:",
                    len(b.token_times),
                    b.completion_tokens,
                    b.finish_reason,
                    flush=True,
                )
    if rnd >= 0:
        print(
            f"round {rnd}: "
            + "  ".join(
                f"{n} {raw[n]['ttft'][-1]:.1f}ms {raw[n]['tps'][-1]:.1f}t/s" for n in names
            ),
            flush=True,
        )

base = raw["in-process"]
print(
    f"\nprompt {L} tokens, decode {NDEC} tokens, {ROUNDS} interleaved rounds (medians; per-round ratio medians)"
)
print(
    f"{'target':16s} {'TTFT ms':>9s} {'dTTFT ms':>9s} {'decode tok/s':>13s} {'ratio':>7s} {'TTFT min':>9s} {'tps max':>8s}"
)
for n in names:
    r = raw[n]
    dt = statistics.median(x - y for x, y in zip(r["ttft"], base["ttft"]))
    ratio = statistics.median(x / y for x, y in zip(r["tps"], base["tps"]))
    print(
        f"{n:16s} {statistics.median(r['ttft']):9.1f} {dt:+9.1f} {statistics.median(r['tps']):13.1f} {ratio:7.3f} {min(r['ttft']):9.1f} {max(r['tps']):8.1f}"
    )
(out / "compare.json").write_text(json.dumps(raw))
for s in servers:
    s.stop()
