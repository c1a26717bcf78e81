"""Output assembly of one generation: text, usage counts, EOS, logprobs, peak memory."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx

from mlxd.engine import GenerationRequest, SamplingParams
from mlxd.sequence import Sequence, token_logprobs


class Detok:
    def __init__(self) -> None:
        self.last_segment = ""

    def reset(self) -> None:
        self.last_segment = ""

    def add_token(self, token: int) -> None:
        self.last_segment = f"<{token}>"

    def finalize(self) -> None:
        self.last_segment = ""


class Tok:
    eos_token_ids = (0,)

    @property
    def detokenizer(self) -> Detok:
        return Detok()


def seq(max_tokens: int, logprobs: int | None = None) -> tuple[Sequence, list[Any]]:
    out: list[Any] = []
    req = GenerationRequest([5, 6, 7], max_tokens, SamplingParams(), Tok(), logprobs=logprobs)
    return Sequence(req, out.append, reused=2), out


def test_tokens_then_length_on_the_last() -> None:
    s, _ = seq(2)
    first = s.add(11, None)
    last = s.add(12, None)
    assert first is not None and last is not None
    assert (first.text, first.finish_reason, first.completion_tokens) == ("<11>", None, 1)
    assert (last.finish_reason, last.completion_tokens, last.prompt_tokens) == ("length", 2, 3)
    assert last.cached_tokens == 2 and s.done


def test_eos_is_not_output_nor_counted() -> None:
    s, _ = seq(5)
    s.add(11, None)
    s.peak = 123
    assert s.add(0, None) is None  # EOS
    end = s.finish("stop")
    assert (end.token, end.finish_reason, end.completion_tokens, end.peak_bytes) == (
        None, "stop", 1, 123,
    )  # fmt: skip


def test_logprobs_of_the_sampled_token_and_top_alternatives() -> None:
    logits = mx.array([[1.0, 3.0, 2.0, 0.0]])
    row = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    got = token_logprobs(row, 2, 2)
    expected = row.reshape(-1).tolist()
    assert math.isclose(got["logprob"], expected[2], rel_tol=1e-6)
    assert [t for t, _ in got["top_logprobs"]] == [1, 2]
    assert token_logprobs(row, 2, None) == {}
    assert "top_logprobs" not in token_logprobs(row, 2, 0)
    s, _ = seq(4, logprobs=1)
    chunk = s.add(1, row)
    assert chunk is not None and chunk.top_logprobs is not None and chunk.top_logprobs[0][0] == 1
