"""Enforcing ``tool_choice`` while generating, as mlx-lm logits processors.

``"required"`` and a named function are met by forcing the opening of a call (from
:func:`forced_prefix`, tokenized by the model's tokenizer) with :class:`PrefixForcer`; the model
writes the rest and the tool parser reads it like any other call. A thinking model is first let
finish its reasoning: ``wait_for`` holds the ids of ``</think>`` and the prefix is forced right
after them. ``"none"`` is met by :class:`BanTokens` on the ``<tool_call>`` token.

mlx-lm calls a processor as ``processor(tokens, logits)``: ``tokens`` is the token history
(the prompt it was given, then every generated token) and ``logits`` the next position's, shape
``(1, vocab)``. It builds step n+1 before step n's token is computed, so reading a token's value
would stall that pipeline on every step. The processors here read shapes only; the wait for
``</think>`` is tracked in MLX arrays evaluated along with each step, and the one value read back
(whether the prefix is out, to stop working) is two steps old, so mlx-lm has computed it already.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from typing import Literal

import mlx.core as mx

ToolCallFormat = Literal["json", "xml"]


def forced_prefix(fmt: ToolCallFormat, name: str | None) -> str:
    """The text a call must start with: any call (`name` None) or a call of function `name`."""
    if name is None:
        return "<tool_call>\n"
    if fmt == "xml":
        return f"<tool_call>\n<function={name}>\n"
    return f'<tool_call>\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": '


def _only(token: mx.array | int, logits: mx.array, positions: mx.array) -> mx.array:
    """Logits where `token` is the only possible choice."""
    return mx.where(positions == token, mx.zeros_like(logits), mx.array(-mx.inf, logits.dtype))


class PrefixForcer:
    """Forces `token_ids`, one per step, from the first generated token or right after `wait_for`.

    `prompt_len` is the length of the history at the first call (the prompt handed to mlx-lm's
    generation, which is shorter than the whole prompt when a prompt cache supplies the rest);
    None takes it from the first call. `wait_for` is searched for in generated tokens only, so a
    ``</think>`` inside the prompt does not count. Once the prefix is out, the processor passes
    logits through unchanged. One instance serves one generation.
    """

    def __init__(
        self,
        token_ids: Sequence[int],
        prompt_len: int | None = None,
        wait_for: Sequence[int] | None = None,
    ) -> None:
        if not token_ids:
            raise ValueError("the prefix needs at least one token")
        if wait_for is not None and not wait_for:
            raise ValueError("wait_for needs at least one token")
        self.token_ids = list(token_ids)
        self.wait_for = list(wait_for) if wait_for is not None else None
        self._start = prompt_len
        self._done = False
        self._positions: mx.array | None = None
        # Waiting mode: the index into token_ids forced at each recent step (-1: still waiting).
        self._forced = mx.array(-1, mx.int32)
        self._recent: deque[mx.array] = deque(maxlen=2)
        self._ids = mx.array(self.token_ids, mx.int32)
        self._wait = mx.array(self.wait_for or [0], mx.int32)

    @property
    def done(self) -> bool:
        """True once the processor is known to pass logits through for good.

        In waiting mode that is learnt two steps late, from a step already computed.
        """
        return self._done

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._done:
            return logits
        seen = tokens.shape[-1]
        if self._start is None:
            self._start = seen
        step = seen - self._start
        if self._positions is None or self._positions.shape[-1] != logits.shape[-1]:
            self._positions = mx.arange(logits.shape[-1])
        if self.wait_for is None:
            if step >= len(self.token_ids):
                self._done = True
                return logits
            return _only(self.token_ids[step], logits, self._positions)
        return self._after_wait(tokens, logits, step, self._positions)

    def _after_wait(
        self, tokens: mx.array, logits: mx.array, step: int, positions: mx.array
    ) -> mx.array:
        assert self.wait_for is not None
        n = len(self.token_ids)
        # Two calls back is a step mlx-lm has already computed and emitted, so reading it is free.
        if len(self._recent) == 2 and bool((self._recent[0] >= n - 1).item()):
            self._done = True
            return logits
        width = len(self.wait_for)
        if step >= width:
            matched = mx.all(tokens[..., -width:].reshape(-1) == self._wait)
        else:
            matched = mx.array(False)
        waiting = self._forced < 0
        forced = mx.where(waiting, mx.where(matched, 0, -1), self._forced + 1)
        self._forced = forced
        self._recent.append(forced)
        active = (forced >= 0) & (forced < n)
        token = self._ids[mx.clip(forced, 0, n - 1)]
        return mx.where(active, _only(token, logits, positions), logits)


class BanTokens:
    """Makes `token_ids` impossible (``tool_choice: "none"`` bans ``<tool_call>``)."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        if not token_ids:
            raise ValueError("nothing to ban")
        self.token_ids = sorted(set(token_ids))
        self._mask: mx.array | None = None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        vocab = logits.shape[-1]
        if self._mask is None or self._mask.shape[-1] != vocab:
            if self.token_ids[-1] >= vocab or self.token_ids[0] < 0:
                raise ValueError(f"token ids {self.token_ids} do not fit a vocabulary of {vocab}")
            mask = mx.zeros((vocab,), dtype=mx.bool_)
            mask[mx.array(self.token_ids)] = True
            self._mask = mask
        return mx.where(self._mask, mx.array(-mx.inf, logits.dtype), logits)
