"""Does the grammar processor wait for the forward pass it has just started?

mlx-lm calls a logits processor while building step n+1: the history ends in token n (a lazy
array) and the logits are the lazy forward pass of n+1. The processor needs token n on the CPU
to advance its matcher. Read as ``tokens[-1].item()`` after starting the pass, the slice is a new
op queued behind the whole pass on the same stream, so the read returns only when the pass is
done and the mask is then computed while the device idles. ``GrammarProcessor`` starts the
history first and reads it from the evaluated buffer, so it returns while the pass still runs.

    python bench/token_read.py --model-dir DIR [--size 512] [--depth 6] [--repeats 7]

A stand-in pass (``--depth`` matmuls of ``--size``²) plays the forward pass, the model's
tokenizer and a JSON-object grammar play the rest. Prints a markdown table: how long the call
took to return, and how long the pass still needed after it (medians). MLX schedules one stream
in order on every backend, so the CPU shows the same ordering a GPU does.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import TokenBuffer
from mlx_lm.utils import load_tokenizer

from mlxd.bench.meta import versions
from mlxd.grammar import GrammarProcessor, compile_grammar, json_grammar


def naive(tokens: mx.array, logits: mx.array) -> mx.array:
    """The read this replaced: start the pass, then ``.item()`` the last token."""
    mx.async_eval(logits)
    int(tokens[-1].item())  # type: ignore[arg-type]
    return logits


Processor = Callable[[mx.array, mx.array], mx.array]
VOCAB = 49152  # the logits' width (the mask is cut or padded to it)


def timed(call: Processor, token: int, weights: mx.array, depth: int) -> tuple[float, float]:
    """Seconds until ``call`` returns, then seconds the pass still needed."""
    history = TokenBuffer([1, 2, 3])
    tokens = history.update_and_fetch(mx.array([token]) + 0)  # lazy, like a sampled token
    x = weights
    for _ in range(depth):
        x = x @ weights
    logits = mx.zeros((1, VOCAB)) + x[0, 0] * 0  # depends on the whole pass
    start = time.perf_counter()
    out = call(tokens, logits)
    returned = time.perf_counter() - start
    start = time.perf_counter()
    mx.eval(out)
    return returned, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    tokenizer: Any = load_tokenizer(args.model_dir)
    grammar = compile_grammar(tokenizer, json_grammar(None), "response_format")
    brace = tokenizer.encode("{", add_special_tokens=False)[0]
    weights = mx.random.normal((args.size, args.size)) / args.size**0.5
    mx.eval(weights)

    def processor() -> Processor:
        proc = GrammarProcessor(tokenizer, grammar)
        mx.eval(proc(mx.array([1, 2, 3]), mx.zeros((1, VOCAB))))  # the first call: the prompt
        return proc

    rows = []
    for name, make in (("tokens[-1].item() after the pass started", lambda: naive),
                       ("GrammarProcessor (history first)", processor)):  # fmt: skip
        runs = [timed(make(), brace, weights, args.depth) for _ in range(args.repeats)]
        back = statistics.median(r[0] for r in runs) * 1000
        rest = statistics.median(r[1] for r in runs) * 1000
        rows.append(f"| {name} | {back:.1f} | {rest:.1f} |")
    print(f"{mx.default_device()}, mlx {versions()['mlx']}; a pass of {args.depth} matmuls of "
          f"{args.size}²; medians of {args.repeats}\n")  # fmt: skip
    print("| read | call returned after (ms) | pass still needed (ms) |")
    print("|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
