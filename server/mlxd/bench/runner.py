"""How a benchmark runs: the prompts, the plan, and the scenarios played against a target.

Every target gets the same messages, rendered with the model's chat template, and the same
``max_tokens``; rates are computed the same way from the arrival times (see `report`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlxd.bench.report import JOINER, MemoryRecord, RequestRecord, scenario_label
from mlxd.bench.targets import MemoryWatch, Messages, Target

Say = Callable[[str], None]


# --------------------------------------------------------------------------- prompts

# Plain words for filler text: common, single-token in most vocabularies.
_WORD_TEXT = (
    "river mountain garden window silver morning evening harbor village market bridge "
    "lantern forest meadow valley ocean island desert winter summer autumn spring thunder "
    "candle library teacher student painter farmer baker doctor sailor engineer musician "
    "traveler quietly slowly brightly gently carefully suddenly always often never sometimes "
    "build carry follow gather listen measure notice open remember travel wander write "
    "ancient bright careful distant empty gentle golden hidden narrow patient silent wooden "
    "the a of and to in with from under over near beyond through across between "
)
_WORDS = tuple(_WORD_TEXT.split())

LONG_OUTPUT_REQUEST = (
    "Count from 1 to 10000, writing every number in English words, one per line. "
    "Do not skip numbers, do not stop early and do not add any other text."
)


def fit(count: Callable[[int], int], target: int, limit: int = 1 << 20) -> int:
    """The largest n with count(n) <= target, for a non-decreasing count (0 if none fits)."""
    lo, hi = 0, 1
    while count(hi) <= target:
        lo, hi = hi, hi * 2
        if hi > limit:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


class PromptBook:
    """Deterministic prompts, sized in tokens with the model's own tokenizer and chat template.

    Every request begins with a distinct system line (``nonce``), so no server can answer it
    from a prefix cache filled by another request; only the chat scenario shares history.
    """

    def __init__(self, tokenizer: Any, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self._rng = random.Random(seed)
        self._words: list[str] = []
        self._sized: dict[tuple[str, int], Messages] = {}  # every target gets the same prompts

    def count(self, messages: Messages) -> int:
        return len(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def filler(self, start: int, n_words: int) -> str:
        """Plain sentences of ~12 words, from a fixed pseudo-random word stream."""
        while len(self._words) < start + n_words:
            self._words.append(self._rng.choice(_WORDS))
        words = self._words[start : start + n_words]
        sentences = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
        return " ".join(s[:1].upper() + s[1:] + "." for s in sentences)

    @staticmethod
    def system(nonce: str) -> dict[str, str]:
        # A hash first: requests differ from their first tokens after the template's header,
        # where "request prefill-128-0" and "…-1" would share a dozen cacheable tokens.
        tag = hashlib.sha256(nonce.encode()).hexdigest()[:8]
        return {"role": "system", "content": f"{tag}: benchmark request {nonce}. Answer plainly."}

    def long_output(self, nonce: str) -> Messages:
        return [self.system(nonce), {"role": "user", "content": LONG_OUTPUT_REQUEST}]

    def sized(self, nonce: str, n_tokens: int) -> Messages:
        """A request whose rendered prompt is as close to ``n_tokens`` as fits under it."""

        def build(n_words: int) -> Messages:
            text = self.filler(0, n_words) + "\n\nSummarize the text above in one sentence."
            return [self.system(nonce), {"role": "user", "content": text}]

        key = (nonce, n_tokens)
        if key not in self._sized:
            self._sized[key] = build(fit(lambda n: self.count(build(n)), n_tokens))
        return [dict(m) for m in self._sized[key]]

    def chat_user(self, turn: int, n_tokens: int) -> str:
        """The user's message for a chat turn: a distinct passage of about ``n_tokens``."""
        question = f"\n\nQuestion {turn}: what is the passage above about? Answer briefly."

        def text(n_words: int) -> str:
            return self.filler(turn * 100_000, n_words) + question

        n = fit(lambda k: len(self.tokenizer.encode(text(k), add_special_tokens=False)), n_tokens)
        return text(n)


# --------------------------------------------------------------------------- scenarios

ALL_SCENARIOS = ("cold", "warm", "decode", "prefill", "chat", "concurrency", "join")


@dataclass(frozen=True)
class Plan:
    """How much of each scenario to run."""

    repeats: int  # single requests: warm, decode, each prefill length
    group_repeats: int  # whole conversations (chat) and concurrent groups
    short_max_tokens: int  # cold and warm TTFT
    decode_max_tokens: int
    prefill_lengths: tuple[int, ...]
    prefill_max_tokens: int
    chat_turns: int
    chat_user_tokens: int
    chat_max_tokens: int
    concurrency: tuple[int, ...]
    concurrency_max_tokens: int
    # join: ``join_streams`` streams decode, then a ``join_prompt``-token prompt joins them.
    join_streams: int = 4
    join_prompt: int = 8192
    join_max_tokens: int = 256
    scenarios: tuple[str, ...] = ALL_SCENARIOS
    suppress_eos: bool = False
    # An unrecorded round before each concurrent group and each join, the same shape as the
    # measured one: a backend that builds kernels per shape (MLX on CUDA) pays that there, in
    # every target alike, instead of inside the first measured round.
    warmup: bool = True


FULL = Plan(
    repeats=3,
    group_repeats=1,
    short_max_tokens=16,
    decode_max_tokens=128,
    prefill_lengths=(128, 512, 2048, 8192, 32768),
    prefill_max_tokens=4,
    chat_turns=5,
    chat_user_tokens=420,
    chat_max_tokens=32,
    concurrency=(1, 4, 8, 16),
    concurrency_max_tokens=128,
)

QUICK = Plan(
    repeats=1,
    group_repeats=1,
    short_max_tokens=8,
    decode_max_tokens=32,
    prefill_lengths=(64, 256),
    prefill_max_tokens=2,
    chat_turns=5,
    chat_user_tokens=24,
    chat_max_tokens=12,
    concurrency=(1, 4),
    concurrency_max_tokens=12,
    join_streams=2,
    join_prompt=256,
    join_max_tokens=48,
    warmup=False,
)


@dataclass
class TargetRun:
    """What one target produced."""

    records: list[RequestRecord] = field(default_factory=list)
    memory: list[MemoryRecord] = field(default_factory=list)


def _progress(say: Say, rec: RequestRecord, label: str) -> None:
    res = rec.result
    ttft = res.ttft
    tps = res.decode_tps
    say(
        f"{rec.target}: {label}: prompt {rec.prompt_tokens} tok, "
        f"TTFT {'—' if ttft is None else f'{ttft * 1000:.0f} ms'}, "
        f"{res.completion_tokens} tok"
        + ("" if tps is None else f", {tps:.1f} tok/s")
        + (f", cached {res.cached_tokens}" if res.cached_tokens else "")
    )


def run_target(
    target: Target, plan: Plan, book: PromptBook, say: Say, out: TargetRun | None = None
) -> TargetRun:
    """Every scenario of ``plan`` against one target, cold first, memory watched per scenario.

    Results accumulate in ``out`` as they come, so a target failing halfway keeps what it did.
    """
    out = out if out is not None else TargetRun()

    def single(scenario: str, param: int | None, repeat: int, messages: Messages, n: int) -> None:
        result = target.chat(messages, n, conversation=scenario == "chat")
        rec = RequestRecord(target.name, scenario, param, repeat, book.count(messages), result)
        out.records.append(rec)
        suffix = "" if param is None else f" {param}"
        _progress(say, rec, f"{scenario}{suffix} #{repeat + 1}")

    def cold() -> None:
        single("cold", None, 0, book.long_output("cold"), plan.short_max_tokens)

    def warm() -> None:
        for r in range(plan.repeats):
            single("warm", None, r, book.long_output(f"warm-{r}"), plan.short_max_tokens)

    def decode() -> None:
        for r in range(plan.repeats):
            single("decode", None, r, book.long_output(f"decode-{r}"), plan.decode_max_tokens)

    def prefill() -> None:
        for length in plan.prefill_lengths:
            for r in range(plan.repeats):
                messages = book.sized(f"prefill-{length}-{r}", length)
                single("prefill", length, r, messages, plan.prefill_max_tokens)

    def chat() -> None:
        for r in range(plan.group_repeats):
            target.new_conversation()
            history: Messages = [book.system(f"chat-{r}")]
            for turn in range(1, plan.chat_turns + 1):
                history.append(
                    {"role": "user", "content": book.chat_user(turn, plan.chat_user_tokens)}
                )
                single("chat", turn, r, list(history), plan.chat_max_tokens)
                history.append({"role": "assistant", "content": out.records[-1].result.text})
        target.new_conversation()

    def concurrency() -> None:
        for streams in plan.concurrency:
            if plan.warmup:
                warm = [book.long_output(f"streams-warmup-{streams}-{i}") for i in range(streams)]
                target.chat_many(warm, plan.concurrency_max_tokens)
                say(f"{target.name}: {scenario_label('concurrency', streams)}: warmed up")
            for r in range(plan.group_repeats):
                convs = [book.long_output(f"streams-{streams}-{r}-{i}") for i in range(streams)]
                outs = target.chat_many(convs, plan.concurrency_max_tokens)
                group = [
                    RequestRecord(
                        target.name, "concurrency", streams, r, book.count(m), res, i, offset
                    )
                    for i, (m, (offset, res)) in enumerate(zip(convs, outs, strict=True))
                ]
                out.records.extend(group)
                tokens = sum(g.result.completion_tokens for g in group)
                wall = max(g.start_offset + g.result.end_time for g in group)
                say(
                    f"{target.name}: {scenario_label('concurrency', streams)} #{r + 1}: "
                    f"{tokens} tok in {wall:.2f} s "
                    f"({tokens / wall:.1f} tok/s aggregate)"
                )

    def join() -> None:
        if plan.warmup:
            warm = [book.long_output(f"join-warmup-{i}") for i in range(plan.join_streams)]
            target.chat_join(
                warm, plan.join_max_tokens, book.sized("joiner-warmup", plan.join_prompt), 4
            )
            say(f"{target.name}: join {plan.join_prompt} tok: warmed up")
        for r in range(plan.group_repeats):
            convs = [book.long_output(f"join-{r}-{i}") for i in range(plan.join_streams)]
            joiner = book.sized(f"joiner-{r}", plan.join_prompt)
            outs = target.chat_join(convs, plan.join_max_tokens, joiner, 4)
            group = [
                RequestRecord(target.name, "join", plan.join_prompt, r, book.count(m), res, i, off)
                for i, (m, (off, res)) in enumerate(zip([*convs, joiner], outs, strict=True))
            ]
            group[-1].stream = JOINER
            out.records.extend(group)
            ttft = group[-1].result.ttft
            say(
                f"{target.name}: join {plan.join_prompt} tok #{r + 1}: joiner TTFT "
                f"{'—' if ttft is None else f'{ttft:.2f} s'} beside {plan.join_streams} streams"
            )

    steps: dict[str, Callable[[], None]] = {
        "cold": cold,
        "warm": warm,
        "decode": decode,
        "prefill": prefill,
        "chat": chat,
        "concurrency": concurrency,
        "join": join,
    }
    for scenario in ALL_SCENARIOS:
        if scenario not in plan.scenarios:
            continue
        watch = MemoryWatch(target.pid, mlx=target.in_process).start()
        try:
            steps[scenario]()
        finally:
            rss, mlx_peak = watch.stop()
            out.memory.append(MemoryRecord(target.name, scenario, rss, mlx_peak))
    return out
