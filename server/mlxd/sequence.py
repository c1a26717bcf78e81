"""One generation in flight: its tokens, text, logprobs, peak memory and finish.

Both ways the engine decodes (in mlx-lm's ``BatchGenerator`` beside other requests, or alone
through ``generate_step``) feed sampled tokens here, so output assembly — detokenizing, EOS
handling, usage counts, logprobs — exists once and both paths agree on every chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlxd.engine import GenerationChunk, GenerationRequest

Emit = Callable[[Any], None]  # a GenerationChunk or the exception that ended the generation


@dataclass(eq=False)
class Sequence:
    req: GenerationRequest
    emit: Emit
    reused: int = 0  # prompt tokens taken from the prefix cache
    uid: int | None = None  # the BatchGenerator's id once inserted
    generated: list[int] = field(default_factory=list)
    peak: int = 0  # highest MLX peak memory read while this sequence was in flight
    joined_at: float = field(default_factory=time.perf_counter)
    error: BaseException | None = None  # raised by one of its logits processors
    done: bool = False
    _detok: Any = None

    def __post_init__(self) -> None:
        self._detok = self.req.tokenizer.detokenizer
        self._detok.reset()
        if self.req.keep_leading_space and not isinstance(
            getattr(type(self._detok), "text", None), property
        ):
            # mlx-lm's detokenizers drop the leading space of the first token (right for a chat
            # answer, wrong for " Paris" after "The capital of France is"); they drop it only
            # while their text is empty, so seed it with one character that is never emitted.
            self._detok.text, self._detok.offset = "\x00", 1

    @property
    def eos(self) -> set[int]:
        return set() if self.req.ignore_eos else set(self.req.tokenizer.eos_token_ids)

    def chunk(
        self, text: str, token: int | None, finish: str | None, **extra: Any
    ) -> GenerationChunk:
        from mlxd.engine import GenerationChunk

        completion = len(self.generated)
        if finish == "stop" and self.generated and self.generated[-1] in self.eos:
            completion -= 1  # EOS ends the output but is not part of it
        return GenerationChunk(
            text, token, finish, len(self.req.prompt), completion, self.reused,
            logprob=extra.get("logprob"), top_logprobs=extra.get("top_logprobs"),
            peak_bytes=self.peak if finish is not None else 0,
        )  # fmt: skip

    def add(self, token: int, logprobs: Any) -> GenerationChunk | None:
        """Account one sampled token; the chunk to emit, or None when it was EOS (the caller
        then ends the sequence with :meth:`finish`)."""
        self.generated.append(token)
        if token in self.eos:
            return None
        self._detok.add_token(token)
        finish = None
        if len(self.generated) >= self.req.max_tokens:
            self._detok.finalize()
            finish = "length"
        extra = token_logprobs(logprobs, token, self.req.logprobs)
        chunk = self.chunk(self._detok.last_segment, token, finish, **extra)
        if finish is not None:
            self.done = True
        return chunk

    def finish(self, reason: str) -> GenerationChunk:
        """The closing chunk for any end other than reaching ``max_tokens`` on a token."""
        self._detok.finalize()
        self.done = True
        return self.chunk(self._detok.last_segment, None, reason)


def token_logprobs(row: Any, token: int, top: int | None) -> dict[str, Any]:
    """``logprob`` / ``top_logprobs`` of a chunk from the step's log-probabilities (after the
    request's processors, as sampled); empty when the request did not ask for them."""
    if top is None or row is None:
        return {}
    import mlx.core as mx

    row = row.reshape(-1)
    out: dict[str, Any] = {"logprob": float(row[token].item())}
    if top > 0:
        k = min(top, row.shape[0])
        ids = mx.argpartition(-row, k - 1)[:k]
        values = row[ids]
        order = mx.argsort(-values)
        best: list[int] = ids[order].tolist()  # type: ignore[assignment]
        scores: list[float] = values[order].tolist()
        out["top_logprobs"] = [(int(i), float(v)) for i, v in zip(best, scores, strict=True)]
    return out
