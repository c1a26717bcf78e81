"""Working memory: what prefill and decode hold beyond weights and KV cache.

`WorkingMemory` is measured on the running backend by :mod:`mlxd.calibrate`, or, until
then, the prior (`prior_working_memory`), which was fitted once on this project's CPU machine
against ``mx.get_peak_memory()`` (see :func:`mlxd.bench.measure.measure_loaded` and the
constants below).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from mlxd.estimate.architecture import Architecture

DEFAULT_PREFILL_CHUNK = 2048  # mlx-lm's prefill_step_size default

# Calibration (mlx 0.32.4, mlx-lm 0.32.2, CPU backend, against ``mx.get_peak_memory()``;
# SmolLM2-135M float32 and random Qwen3-shaped models, prompts of 16–4200 tokens):
# - an unfused attention holds one score matrix (heads × chunk × keys) in the activation
#   dtype at a time, plus a one-byte causal mask (chunk × keys);
# - everything else a prefill chunk holds, per token and per unit of (hidden + MLP width +
#   attention width), came to 16.4–16.7 bytes with float32 activations and 11.1 bytes with
#   bfloat16 ones: about 2.8 copies in the activation dtype plus 1.4 in float32 (norms,
#   RoPE and softmax work in float32); 3 and 1.5 are used;
# - a greedy decode step holds 4.2 vocabulary rows in the activation dtype (logits,
#   log-softmax, and the next step that mlx-lm evaluates ahead); temperature + top-p +
#   top-k sampling added 7.75 float32 rows (sorting the vocabulary).
ACTIVATION_COPIES = 3.0
FLOAT32_COPIES = 1.5
SCORE_COPIES = 1.0
MASK_BYTES = 1
DECODE_LOGIT_ROWS = 4.5
SAMPLING_ROWS = 8

Backend = Literal["metal", "cuda", "cpu"]

# Head dims that Metal's fused attention kernel runs for prompts (query length > 8) in
# mlx 0.32; other head dims (192, 256: Gemma-3, Qwen3.5) fall back to the unfused path,
# which materializes the scores. CPU and CUDA prefill are counted as unfused.
METAL_FUSED_PREFILL_HEAD_DIMS = frozenset({64, 72, 80, 96, 128})


@dataclass(frozen=True)
class WorkingMemory:
    """What prefill and decode hold beyond weights and KV cache, in bytes: the terms that
    calibration (:mod:`server.calibrate`) measures on the running backend.

    - Prefill: ``prefill_curves`` holds, per measured chunk size ``n`` (ascending), a curve of
      ``(keys, work)`` points: what a chunk of ``n`` tokens holds while its attention reads
      ``keys`` keys (the context so far plus the chunk). Work grows with ``n × keys`` where a
      kernel materializes the score matrix, and not always linearly (a kernel may switch to
      float32 scores for long keys, and on a GPU the old KV buffers of a growing cache stay
      allocated until the stream finishes), so the curve is measured at several depths, up
      to the deepest the budget allows, and read piecewise linearly: between points
      interpolated, beyond the last following its last segment. Between chunk sizes the
      work is interpolated linearly, below the smallest it is proportional.
    - Decode: one sequence's step at context ``k`` holds ``decode_fixed + decode_per_key · k``,
      plus ``sampling`` when it samples (top-p/top-k sort the vocabulary) rather than taking
      the argmax. A batch of sequences holds the sum of theirs.

    ``quantized_per_token_key`` is added per token × key once a ``kv_bits`` cache is quantized
    (mlx-lm's quantized attention is written out in plain ops: it materializes the scores).
    """

    prefill_curves: tuple[tuple[int, tuple[tuple[int, float], ...]], ...]
    decode_fixed: float
    decode_per_key: float
    sampling: float
    quantized_per_token_key: float
    source: str = "prior"  # "prior" (from the architecture), "measured", "learned"

    def prefill(self, tokens: int, keys: int, quantized: bool = False) -> float:
        """Working memory of one prefill chunk of ``tokens`` tokens reading ``keys`` keys."""
        curves = self.prefill_curves
        extra = self.quantized_per_token_key * tokens * keys if quantized else 0.0
        n0, first = curves[0]
        if tokens <= n0:
            return _read_curve(first, keys) * tokens / n0 + extra
        for (a, ca), (b, cb) in itertools.pairwise(curves):
            if tokens <= b:
                t = (tokens - a) / (b - a)
                wa, wb = _read_curve(ca, keys), _read_curve(cb, keys)
                return wa + (wb - wa) * t + extra
        n1, last = curves[-1]
        return _read_curve(last, keys) * tokens / n1 + extra

    def decode(self, context: int, sampling: bool) -> float:
        """Working memory of one sequence's decode step at ``context`` tokens."""
        extra = self.sampling if sampling else 0.0
        return self.decode_fixed + self.decode_per_key * context + extra

    def raised(self, phase: str, factor: float) -> WorkingMemory:
        """These terms with one phase's (``prefill`` or ``decode``) scaled up by ``factor``."""
        if factor <= 1.0:
            return self
        if phase == "decode":
            return replace(
                self,
                decode_fixed=self.decode_fixed * factor,
                decode_per_key=self.decode_per_key * factor,
                sampling=self.sampling * factor,
                source="learned",
            )
        return replace(
            self,
            prefill_curves=tuple(
                (n, tuple((k, w * factor) for k, w in curve)) for n, curve in self.prefill_curves
            ),
            quantized_per_token_key=self.quantized_per_token_key * factor,
            source="learned",
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "prefill_curves": [[n, [list(p) for p in curve]] for n, curve in self.prefill_curves],
            "decode_fixed": self.decode_fixed,
            "decode_per_key": self.decode_per_key,
            "sampling": self.sampling,
            "quantized_per_token_key": self.quantized_per_token_key,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WorkingMemory:
        return cls(
            prefill_curves=tuple(
                (int(n), tuple((int(k), float(w)) for k, w in curve))
                for n, curve in data["prefill_curves"]
            ),
            decode_fixed=float(data["decode_fixed"]),
            decode_per_key=float(data["decode_per_key"]),
            sampling=float(data["sampling"]),
            quantized_per_token_key=float(data["quantized_per_token_key"]),
            source=str(data.get("source", "measured")),
        )


def _read_curve(curve: tuple[tuple[int, float], ...], keys: int) -> float:
    """A piecewise-linear curve at ``keys``: interpolated inside, its end segments outside
    (never below 0); a one-point curve is flat."""
    if len(curve) == 1:
        return curve[0][1]
    segments = list(itertools.pairwise(curve))
    (k0, w0), (k1, w1) = segments[-1]
    for a, b in segments:
        if keys <= b[0]:
            (k0, w0), (k1, w1) = a, b
            break
    return max(0.0, w0 + (w1 - w0) * (keys - k0) / (k1 - k0))


def prior_working_memory(arch: Architecture, dtype_bytes: int, backend: Backend) -> WorkingMemory:
    """The hand-written model of working memory (calibrated once on the CPU backend, see the
    constants above): the estimate's terms until the running backend has measured its own."""
    width = arch.hidden_size + arch.mlp_width + arch.attention_width
    per_token = width * _activation_bytes(dtype_bytes)
    scores = arch.num_heads * SCORE_COPIES * dtype_bytes + MASK_BYTES
    slope = 0.0 if not _materializes_scores(backend, arch.head_dim, quantized=False) else scores
    n = DEFAULT_PREFILL_CHUNK
    curve = tuple((k, per_token * n + slope * n * k) for k in (n, 2 * n))
    return WorkingMemory(
        prefill_curves=((n, curve),),
        decode_fixed=DECODE_LOGIT_ROWS * dtype_bytes * arch.vocab_size + per_token,
        decode_per_key=arch.num_heads * 4.0,  # one float32 query row per head
        sampling=SAMPLING_ROWS * 4.0 * arch.vocab_size,
        quantized_per_token_key=scores,
    )


def _materializes_scores(backend: Backend, head_dim: int, quantized: bool) -> bool:
    if quantized:  # mlx-lm's quantized attention is written out in plain ops
        return True
    return not (backend == "metal" and head_dim in METAL_FUSED_PREFILL_HEAD_DIMS)


def _activation_bytes(dtype_bytes: int) -> float:
    """Bytes held per token per unit of layer width while a layer runs."""
    return ACTIVATION_COPIES * dtype_bytes + FLOAT32_COPIES * 4
