"""Constrained decoding: output that matches a grammar by construction (llguidance).

A :class:`GrammarProcessor` is an mlx-lm logits processor (``(tokens, logits) -> logits``) that
keeps one llguidance matcher per sequence, so it works alone or inside a batch (one instance per
sequence). At every step it advances the matcher by the token just sampled and masks the logits
to the tokens the grammar allows next; once the grammar is complete only EOS is allowed.

A processor may start *armed*: it passes logits through until the generated text contains a
trigger (``</think>`` so a reasoning model thinks freely first; a call's opening under
``tool_choice: auto`` so a call, once opened, is finished validly), then constrains what follows
the trigger. With ``rearm`` it goes back to watching once the grammar is complete (the next call).

Pipelining: mlx-lm builds step n+1 before step n's token is known. Advancing the matcher needs
that token, so the processor first starts the token history and then the forward pass of n+1
(``mx.async_eval``, in that order on the stream), waits for the history only and computes the
mask on the CPU while the forward pass runs. Only the masking and sampling wait for the mask.

Why llguidance (measured on SmolLM2, 49,152 tokens, CPU, see bench/results/): masks in
10–170 µs per token with no per-schema compile step (2–3 ms to build a matcher), lazy
grammars (Lark with embedded ``%json``) for whole tool calls in either call format, and
unsupported JSON-schema keywords reported by name. outlines-core builds a whole-vocabulary
index per schema first (14–100 ms for small schemas, growing with the schema) and takes regular
languages only; xgrammar's Python package requires torch.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from mlxd.errors import BadRequest

log = logging.getLogger("mlxd.grammar")

# Compact JSON with one space after ',' and ':' (the layout models are trained on). Flexible
# whitespace lets a small model pad forever; a fixed layout keeps outputs short and bounded.
JSON_LAYOUT: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


@functools.lru_cache(maxsize=8)
def llg_tokenizer(tokenizer: Any) -> Any:
    """The llguidance view of an mlx-lm tokenizer (about 0.5 s to build; cached per tokenizer)."""
    import llguidance.hf

    eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    return llguidance.hf.from_tokenizer(tokenizer._tokenizer, eos_token=eos)


def json_schema_lark(schema: dict[str, Any]) -> str:
    """A Lark fragment (one rule body) matching JSON valid against `schema`."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_LAYOUT}, ensure_ascii=False)


def lark_literal(text: str) -> str:
    """`text` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \[("[^"]+"(?:, "[^"]+")*)\]')


def unsupported_keyword(error: str) -> str | None:
    """The first JSON-schema keyword llguidance reports as unimplemented, if any."""
    m = _UNIMPLEMENTED.search(error)
    if m:
        return str(json.loads(f"[{m.group(1)}]")[0])
    m = re.search(r"Unknown format: (\S+)", error)
    return f"format: {m.group(1)}" if m else None


def compile_grammar(tokenizer: Any, lark: str, param: str, markers: Sequence[str] = ()) -> str:
    """Validate a Lark grammar against the model's vocabulary; a 400 naming `param` if it fails.

    `markers` (a tool call's open and close text): where one is a single special token, the
    grammar names that token by id instead of by its text. Returns the grammar in llguidance's
    serialized form, ready for :class:`GrammarProcessor`.
    """
    import llguidance

    llg = llg_tokenizer(tokenizer)
    for tag in markers:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        if len(ids) == 1 and llg.is_special_token(ids[0]):
            lark = lark.replace(lark_literal(tag), f"<[{ids[0]}]>")
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, llg_tokenizer(tokenizer)
    )
    if is_error:
        error = "; ".join(messages)
        keyword = unsupported_keyword(error)
        if keyword is not None:
            raise BadRequest(
                f"{param}: the JSON schema uses {keyword!r}, which constrained decoding does not "
                f"support ({error})",
                param=param,
            )
        raise BadRequest(f"{param}: cannot be compiled for constrained decoding: {error}",
                         param=param)  # fmt: skip
    return str(grammar)


def _pack(flags: np.ndarray) -> np.ndarray:
    """Booleans per token id → llguidance's mask layout (bit i of word i // 32)."""
    padded = np.zeros(((flags.size + 31) // 32) * 32, dtype=np.uint8)
    padded[: flags.size] = flags
    return np.packbits(padded, bitorder="little").view(np.int32)


# Closing ranks: how directly a token winds JSON up, as level << 10 | (1023 - its length), so
# the smallest rank among the allowed tokens is the most closing one, longest first.
_CLOSERS = frozenset(b"}] ")
_SHORT_VALUE = re.compile(rb'^ ?(""|\[\]|\{\}|-?[0-9]+|true|false|null)[\]}]*$')


def _rank(level: int, raw: bytes) -> int:
    return level << 10 | (1023 - min(len(raw), 1023))


@functools.lru_cache(maxsize=8)
def closing_ranks(tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per token id, its closing rank outside a JSON string and inside one.

    Outside: EOS, then tokens of only ``}``/``]``, then ``,``/``:``, then a whole short value
    (``""``, ``[]``, ``{}``, an integer, ``true``, ``false``, ``null``, closers after it), then
    tokens that open a string (a required key), then the rest. Inside: tokens whose first
    unescaped ``"`` is followed by closers only, then any token with an unescaped ``"``.
    """
    llg = llg_tokenizer(tokenizer)
    outside = np.full(llg.vocab_size, _rank(6, b""), dtype=np.int32)
    inside = np.full(llg.vocab_size, _rank(6, b""), dtype=np.int32)
    eos = {t for t in llg.eos_tokens if t < llg.vocab_size}
    for i in range(llg.vocab_size):
        raw = llg.decode_bytes([i])
        if i in eos:
            outside[i] = inside[i] = _rank(0, b"")
            continue
        if not raw or llg.is_special_token(i):
            continue
        stripped = raw.strip(b" ")
        if stripped and set(stripped) <= _CLOSERS:
            level = 1
        elif stripped in (b",", b":"):
            level = 2
        elif _SHORT_VALUE.match(raw):
            level = 3
        elif stripped.startswith(b'"'):
            level = 4
        else:
            level = 5
        outside[i] = _rank(level, raw)
        unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
        quote = unescaped.find(b'"')
        if quote >= 0:
            inside[i] = _rank(1 if set(unescaped[quote + 1 :]) <= _CLOSERS else 2, raw)
    return outside, inside


@dataclass
class _JsonDepth:
    """Tracks, byte by byte, whether JSON text is inside a string and how deeply it is nested."""

    in_string: bool = False
    escape: bool = False
    depth: int = 0

    def feed(self, data: bytes) -> None:
        for byte in data:
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif byte == 0x5C:  # backslash
                    self.escape = True
                elif byte == 0x22:
                    self.in_string = False
            elif byte == 0x22:
                self.in_string = True
            elif byte in (0x7B, 0x5B):
                self.depth += 1
            elif byte in (0x7D, 0x5D):
                self.depth -= 1


# A closing plan is looked for again this often, and every step once the tokens left come within
# this many of its length (a new nested object can lengthen it by several tokens at once).
REPLAN_EVERY = 16
REPLAN_NEAR = 24
# The plan is written once the tokens left are at most its length plus this.
WIND_UP_SLACK = 1
PLAN_LIMIT = 1024
# A schema that cannot be closed in the budget: the last this many tokens are narrowed to the
# most closing ones allowed (the answer is cut off all the same, but as short as it can be).
LATE_WINDOW = 16
# Near the end, this many of the model's likeliest tokens are checked against the budget.
FIT_CANDIDATES = 6


class GrammarProcessor:
    """Masks logits to a grammar; one instance per sequence (see the module docstring).

    `trigger`: text after which the grammar starts (None: from the first token). `rearm`: after
    the grammar is complete, watch for the trigger again instead of allowing only EOS.

    `budget` (max_tokens, for JSON grammars): the processor keeps a *closing plan*, the tokens a
    closing policy would write from here to EOS (on a copy of the matcher: at each step the
    allowed token of the best closing rank, see :func:`closing_ranks`; required keys, minimums
    and forced text are the grammar's). Within ``REPLAN_NEAR`` tokens of the plan's length, the
    model picks among its likeliest allowed tokens after which a plan still fits (so it cannot
    open an optional key it has no room to finish); once the tokens left come down to the plan's
    length (plus one), the plan's tokens are written: the answer is complete JSON ending in EOS
    inside the budget whenever the policy can close the schema in it.
    """

    def __init__(
        self,
        tokenizer: Any,
        grammar: str,
        trigger: str | None = None,
        rearm: bool = False,
        budget: int | None = None,
    ) -> None:
        import llguidance

        self._llg = llg_tokenizer(tokenizer)
        self._decode = tokenizer.decode  # text of special tokens too (llguidance hides it)
        self._budget = budget
        self._generated = 0
        self._json = _JsonDepth()
        self._ranks = closing_ranks(tokenizer) if budget is not None else None
        self._plan: list[int] | None = None  # the closing plan, while the model follows it
        self._planned_at = 0
        self._plan_length = 0  # of the last plan made (a guide for when to plan again)
        self._late = False  # no plan fits in the tokens left: close as directly as possible
        self._grammar = grammar
        self._trigger = trigger.encode() if trigger else None
        self._rearm = rearm and trigger is not None
        self._matcher: Any = None
        self._llguidance = llguidance
        self._tail = b""  # recent generated bytes while watching for the trigger
        self._started = False
        self._words = np.zeros((self._llg.vocab_size + 31) // 32, dtype=np.int32)
        self._shifts: mx.array | None = None  # made on the MLX thread that runs the generation
        self.failed: str | None = None  # why constraining stopped early, if it did
        if self._trigger is None:
            self._start_matcher(b"")

    @property
    def active(self) -> bool:
        return self._matcher is not None

    def _start_matcher(self, after: bytes) -> None:
        """Begin constraining; `after` is text already generated past the trigger."""
        self._matcher = self._llguidance.LLMatcher(self._llg, self._grammar, log_level=1)
        self._json = _JsonDepth()
        self._plan, self._late = None, False
        if after:
            ids = self._llg.tokenize_bytes(after)
            if self._matcher.try_consume_tokens(ids) != len(ids):
                self._stop(f"the text after the trigger does not fit the grammar: {after!r}")
            self._json.feed(after)

    def _stop(self, why: str) -> None:
        log.warning("constrained decoding stopped: %s", why)
        self.failed = why
        self._matcher = None
        self._trigger = None  # never again for this sequence

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if not self._started:  # first call: tokens is the prompt, nothing generated yet
            self._started = True
            return self._mask(logits) if self._matcher is not None else logits
        self._generated += 1
        if self._matcher is None and self._trigger is None:
            return logits
        mx.async_eval(tokens)  # token n, queued ahead of the forward pass of n+1
        mx.async_eval(logits)  # the forward pass runs while the matcher catches up
        # Read from the evaluated history (a view, no copy), not with ``tokens[-1].item()``: that
        # slice would be a new op queued behind the forward pass, so the read waited for the
        # whole pass (bench/token_read.py; a processor doing only that added ~3 ms a step on an
        # H200).
        token = int(np.asarray(tokens).reshape(-1)[-1])
        if self._matcher is None:
            self._watch(token)
        elif not self._matcher.consume_token(token):
            self._stop(self._matcher.get_error() or f"token {token} rejected")
        else:
            self._json.feed(self._llg.decode_bytes([token]))
            if self._plan and self._plan[0] == token:
                self._plan = self._plan[1:]  # still on the plan: it holds from here
            else:
                self._plan = None
            if self._rearm and self._matcher.is_accepting():
                self._matcher = None  # this call is complete: back to free text
                self._tail = b""
        if self._matcher is None:
            return logits
        return self._mask(logits)

    def _watch(self, token: int) -> None:
        assert self._trigger is not None
        self._tail += self._decode([token]).encode()
        at = self._tail.find(self._trigger)
        if at < 0:
            self._tail = self._tail[-len(self._trigger) :]
            return
        after = self._tail[at + len(self._trigger) :]
        self._tail = b""
        self._start_matcher(after)
        if not self._rearm and self._matcher is not None:
            self._trigger = None

    # ---- winding JSON up before the budget ends ------------------------------------------

    def _allowed(self, words: np.ndarray) -> np.ndarray:
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")
        return np.flatnonzero(bits[: self._llg.vocab_size])

    def _closing(self, allowed: np.ndarray, in_string: bool) -> np.ndarray:
        """The ranks of the ``allowed`` token ids."""
        assert self._ranks is not None
        ranks: np.ndarray = self._ranks[1 if in_string else 0][allowed]
        return ranks

    def _make_plan(self, limit: int, first: int | None = None) -> list[int] | None:
        """The closing policy's tokens from here (after `first`, when given) through EOS, or
        None if it needs over `limit`."""
        matcher = self._matcher.deep_copy()
        depth = _JsonDepth(self._json.in_string, self._json.escape, self._json.depth)
        if first is not None:
            if first in self._llg.eos_tokens:
                return []
            if not matcher.consume_token(first):
                return None
            depth.feed(self._llg.decode_bytes([first]))
        words = np.empty_like(self._words)
        plan: list[int] = []
        while len(plan) < limit:
            matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
            allowed = self._allowed(words)
            if matcher.is_error() or not allowed.size:
                return None
            token = int(allowed[np.argmin(self._closing(allowed, depth.in_string))])
            plan.append(token)
            if token in self._llg.eos_tokens:
                return plan
            if not matcher.consume_token(token):
                return None
            if self._rearm and matcher.is_accepting():  # the call is complete: free text next
                return plan
            depth.feed(self._llg.decode_bytes([token]))
        return None

    def _fitting(self, plan: list[int], left: int, logits: mx.array) -> np.ndarray:
        """Of the model's likeliest allowed tokens, those after which the schema can still be
        closed in time (the plan's next token always can): near the end a token that opens
        more structure (a ``,`` before an optional key) must not make the budget too short."""
        allowed = self._allowed(self._words)
        scores = np.array(logits.reshape(-1)[: self._llg.vocab_size].astype(mx.float32))
        likeliest = allowed[np.argsort(-scores[allowed])[:FIT_CANDIDATES]]
        keep = [plan[0]]
        for token in likeliest.tolist():
            if token != plan[0]:
                after = self._make_plan(left - 1, first=token)
                if after is not None:
                    keep.append(token)
        return np.array(keep, dtype=np.int64)

    def _wind_up(self, logits: mx.array) -> None:
        """Narrow ``self._words`` (the grammar's mask) for the budget; see the class docstring."""
        assert self._budget is not None
        left = self._budget - self._generated  # tokens that may still be sampled, EOS included
        if left <= 0:  # the step after the last one (computed ahead); never sampled
            return
        if not self._late and self._plan is None:
            due = (
                self._plan_length == 0
                or left <= self._plan_length + REPLAN_NEAR
                or self._generated - self._planned_at >= REPLAN_EVERY
            )
            if due:
                self._plan = self._make_plan(min(left + REPLAN_NEAR, PLAN_LIMIT))
                self._planned_at = self._generated
                if self._plan is not None:
                    self._plan_length = len(self._plan)
                elif left + REPLAN_NEAR <= PLAN_LIMIT:
                    self._late = True  # cannot be closed in time: close as directly as it can
        plan = self._plan
        if plan and left <= len(plan) + WIND_UP_SLACK:
            keep = np.array(plan[:1], dtype=np.int64)  # write the plan
        elif plan and left <= len(plan) + REPLAN_NEAR:
            keep = self._fitting(plan, left, logits)
        elif self._late and left <= LATE_WINDOW:
            allowed = self._allowed(self._words)  # the most closing tokens, the model's pick
            ranks = self._closing(allowed, self._json.in_string)
            keep = allowed[(ranks >> 10) == (ranks.min() >> 10)]
        else:
            return
        flags = np.zeros(self._llg.vocab_size, dtype=bool)
        flags[keep] = True
        self._words[:] = _pack(flags)

    def _mask(self, logits: mx.array) -> mx.array:
        matcher = self._matcher
        matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        if matcher.is_error():
            self._stop(matcher.get_error())
            return logits
        if self._ranks is not None and self._words.any():
            self._wind_up(logits)
        if self._shifts is None:
            self._shifts = mx.arange(32, dtype=mx.uint32)
        words = mx.array(self._words).astype(mx.uint32)
        allowed = ((words[:, None] >> self._shifts) & 1).reshape(-1)
        vocab = logits.shape[-1]
        if allowed.shape[0] >= vocab:
            allowed = allowed[:vocab]
        else:  # the model pads its embedding past the tokenizer: those ids are never allowed
            allowed = mx.concatenate([allowed, mx.zeros(vocab - allowed.shape[0], mx.uint32)])
        return mx.where(allowed.astype(mx.bool_), logits, mx.array(-mx.inf, logits.dtype))


def json_grammar(schema: dict[str, Any] | None, leading: str = "") -> str:
    """Lark for one JSON value: `schema`, or any JSON object when None (``json_object``).

    `leading` is a regex for layout allowed before the value (newlines after ``</think>``).
    """
    body = json_schema_lark(schema if schema is not None else {"type": "object"})
    lead = f"/{leading}/ " if leading else ""
    return f"start: {lead}value\nvalue: {body}\n"
