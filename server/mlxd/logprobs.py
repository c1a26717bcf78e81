"""Token log-probabilities in OpenAI's shape (``choices[].logprobs.content[]``).

The engine reports, per generated token, its log-probability and the ``top_logprobs`` most likely
alternatives, from the distribution the token was drawn from: the model's log-softmax after the
request's logits processors (penalties, ``logit_bias``, a grammar's mask) and before temperature
and top-p, as mlx-lm computes it. Each token's text comes with its exact bytes, which may be part
of a UTF-8 character.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlxd.engine import GenerationChunk
from mlxd.grammar import llg_tokenizer


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[TokenLogprob] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"token": self.token, "logprob": self.logprob, "bytes": self.bytes}
        out["top_logprobs"] = [
            {"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in self.top
        ]
        return out


def _entry(tokenizer: Any, token: int, logprob: float) -> TokenLogprob:
    raw = llg_tokenizer(tokenizer).decode_bytes([token])
    return TokenLogprob(raw.decode("utf-8", errors="replace"), logprob, list(raw))


def token_logprob(tokenizer: Any, chunk: GenerationChunk) -> TokenLogprob:
    """The OpenAI entry for the token of `chunk` (which carries logprob and top_logprobs)."""
    assert chunk.token is not None and chunk.logprob is not None
    head = _entry(tokenizer, chunk.token, chunk.logprob)
    top = [_entry(tokenizer, t, lp) for t, lp in chunk.top_logprobs or []]
    return TokenLogprob(head.token, head.logprob, head.bytes, top)
