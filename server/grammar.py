"""Constrained decoding: output that matches a grammar by construction (llguidance).

A :class:`GrammarProcessor` is an mlx-lm logits processor (``(tokens, logits) -> logits``) that
keeps one llguidance matcher per sequence, so it works alone or inside a batch (one instance per
sequence). At every step it advances the matcher by the token just sampled and masks the logits
to the tokens the grammar allows next; once the grammar is complete only EOS is allowed.

A processor may start *armed*: it passes logits through until the generated text contains a
trigger (``</think>`` so a reasoning model thinks freely first; ``<tool_call>`` under
``tool_choice: auto`` so a call, once opened, is finished validly), then constrains what follows
the trigger. With ``rearm`` it goes back to watching once the grammar is complete (the next call).

Pipelining: mlx-lm builds step n+1 before step n's token is known. Advancing the matcher needs
that token, so the processor first starts the forward pass of n+1 (``mx.async_eval``), then waits
for token n and computes the mask on the CPU while the forward pass runs. Only the masking and
sampling wait for the mask.

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
from typing import Any

import mlx.core as mx
import numpy as np

from server.errors import BadRequest

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


def compile_grammar(tokenizer: Any, lark: str, param: str) -> str:
    """Validate a Lark grammar against the model's vocabulary; a 400 naming `param` if it fails.

    Returns the grammar in llguidance's serialized form, ready for :class:`GrammarProcessor`.
    """
    import llguidance

    llg = llg_tokenizer(tokenizer)
    for tag in ("<tool_call>", "</tool_call>"):  # tags that are special tokens are matched by id
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


@functools.lru_cache(maxsize=8)
def closing_words(tokenizer: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed masks of EOS, of the tokens that close a JSON string (hold an unescaped ``"``) and
    of the tokens that end in ``}`` or ``]``: used to wind JSON up when the budget runs out."""
    llg = llg_tokenizer(tokenizer)
    eos = np.zeros(llg.vocab_size, dtype=bool)
    eos[[t for t in llg.eos_tokens if t < llg.vocab_size]] = True
    quote = np.zeros(llg.vocab_size, dtype=bool)
    close = np.zeros(llg.vocab_size, dtype=bool)
    for i in range(llg.vocab_size):
        raw = llg.decode_bytes([i])
        quote[i] = b'"' in raw.replace(b'\\"', b"")
        close[i] = raw.rstrip().endswith((b"}", b"]"))
    return _pack(eos), _pack(quote), _pack(close)


class _JsonDepth:
    """Tracks, byte by byte, whether JSON text is inside a string and how deeply it is nested."""

    def __init__(self) -> None:
        self.in_string = False
        self._escape = False
        self.depth = 0

    def feed(self, data: bytes) -> None:
        for byte in data:
            if self.in_string:
                if self._escape:
                    self._escape = False
                elif byte == 0x5C:  # backslash
                    self._escape = True
                elif byte == 0x22:
                    self.in_string = False
            elif byte == 0x22:
                self.in_string = True
            elif byte in (0x7B, 0x5B):
                self.depth += 1
            elif byte in (0x7D, 0x5D):
                self.depth -= 1


class GrammarProcessor:
    """Masks logits to a grammar; one instance per sequence (see the module docstring).

    `trigger`: text after which the grammar starts (None: from the first token). `rearm`: after
    the grammar is complete, watch for the trigger again instead of allowing only EOS.

    `budget` (max_tokens, for JSON grammars): when the tokens left get close to what closing the
    open strings, arrays and objects takes, the choice is narrowed, among the tokens the grammar
    allows, to those that close something (EOS first, then a string's closing quote, then ``}``
    or ``]``), so the answer still parses when the budget ends. Required keys and array minimums
    stay enforced by the grammar, so a deep schema may still run out.
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
        self._closers = closing_words(tokenizer) if budget is not None else None
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
        if after:
            ids = self._llg.tokenize_bytes(after)
            if self._matcher.try_consume_tokens(ids) != len(ids):
                self._stop(f"the text after the trigger does not fit the grammar: {after!r}")

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
        mx.async_eval(logits)  # the forward pass runs while the matcher catches up
        token = int(tokens[-1].item())  # type: ignore[arg-type]
        if self._matcher is None:
            self._watch(token)
        elif not self._matcher.consume_token(token):
            self._stop(self._matcher.get_error() or f"token {token} rejected")
        elif self._closers is not None:
            self._json.feed(self._llg.decode_bytes([token]))
        elif self._rearm and self._matcher.is_accepting():
            self._matcher = None  # this call is complete: back to free text
            self._tail = b""
        if self._matcher is None:
            return logits
        return self._mask(logits)

    def _wind_up(self) -> None:
        """Narrow the mask to tokens that close the JSON (see the class docstring)."""
        assert self._closers is not None
        words = self._words
        ends, quote, close = self._closers
        tiers = [ends] + ([quote] if self._json.in_string else [close])
        for tier in tiers:
            narrowed = words & tier
            if narrowed.any():
                words[:] = narrowed
                return

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

    def _mask(self, logits: mx.array) -> mx.array:
        matcher = self._matcher
        matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        if matcher.is_error():
            self._stop(matcher.get_error())
            return logits
        if self._closers is not None and self._budget is not None:
            left = self._budget - self._generated
            if left <= 8 + 2 * max(self._json.depth, 0):
                self._wind_up()
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
