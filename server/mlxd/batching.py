"""Continuous batching: mlx-lm's ``BatchGenerator`` driven one step at a time.

Requests join and leave between steps. Each keeps its own sampler, logits processors, stop
tokens and ``max_tokens`` (all per-sequence options of ``BatchGenerator.insert``); cancelling one
removes it from the batch and the others go on untouched. A joining request starts from the
longest cached prefix and a leaving one hands its KV cache back
(``BatchGenerator.remove(..., return_prompt_caches=True)`` or the finished response's cache).

Long prompts do not stall running streams: ``BatchGenerator`` already prefills one chunk per
step after the decode step; while other sequences are decoding, ``interleave.ChunkSizer`` sizes
the chunk from measured step costs, and when nobody is decoding it is the model's full prefill
chunk, so a lone request's time to first token is unchanged.

Everything here runs on the engine's MLX thread.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mlxd.interleave import ChunkSizer
from mlxd.prefix_cache import PrefixCache
from mlxd.sequence import Sequence

log = logging.getLogger("mlxd.engine")

# Sequences are admitted by the manager (memory, max_concurrency); the generator itself must
# never hold one back, so its own limits are set far above any admitted batch.
UNBOUNDED = 1 << 16


def sampling_parts(seq: Sequence) -> tuple[Any, list[Any]]:
    """The request's sampler and logits processors (the latter guarded, see ``_guard``)."""
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    s = seq.req.sampling
    sampler = make_sampler(
        temp=s.temperature, top_p=s.top_p if s.top_p < 1.0 else 0.0, min_p=s.min_p,
        top_k=max(s.top_k, 0),
    )  # fmt: skip
    processors = make_logits_processors(
        logit_bias=s.logit_bias,
        repetition_penalty=s.repetition_penalty,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
    )
    processors += seq.req.extra_processors
    return sampler, [_guard(seq, p) for p in processors]


def _guard(seq: Sequence, processor: Any) -> Any:
    """A processor that raises fails its own request only, not the whole batch's step."""

    def run(tokens: Any, logits: Any) -> Any:
        if seq.error is not None:
            return logits
        try:
            return processor(tokens, logits)
        except Exception as exc:
            seq.error = exc
            return logits

    return run


def solo_reason(seq: Sequence, model: Any) -> str | None:
    """Why this request cannot share a batch (it then runs alone), or None."""
    req = seq.req
    if req.sampling.seed is not None and req.sampling.temperature > 0:
        return "a fixed seed is reproducible only when the request runs alone"
    if req.kv_bits is not None:
        return "a quantized KV cache cannot be batched"
    from mlx_lm.models.cache import make_prompt_cache

    if not all(hasattr(c, "merge") for c in make_prompt_cache(model, req.max_kv_size)):
        return "this model's cache type cannot be batched"
    return None


def keep_cache(
    prefix_cache: PrefixCache, seq: Sequence, tokens: list[int], cache: list[Any]
) -> None:
    """Give a sequence's KV cache (holding ``tokens``) to the prefix cache."""
    import mlx.core as mx

    if not cache or not tokens:
        return
    offset = getattr(cache[0], "offset", None)
    if isinstance(offset, int) and offset < len(tokens):
        tokens = tokens[:offset]
    # Extracted caches are lazy slices of the batch's arrays: evaluate them now so the batch
    # buffers are not pinned by the copy.
    mx.eval([c.state for c in cache])
    prefix_cache.put(list(tokens), cache, seq.req.max_kv_size, seq.req.kv_bits)


class Batch:
    """The running batch of the resident model."""

    def __init__(self, model: Any, prefix_cache: PrefixCache) -> None:
        from mlx_lm.generate import BatchGenerator

        self.model = model
        self.prefix_cache = prefix_cache
        self.gen = BatchGenerator(
            model, completion_batch_size=UNBOUNDED, prefill_batch_size=8,
            stop_tokens=None,
        )  # fmt: skip
        self.live: dict[int, Sequence] = {}
        self.sizer = ChunkSizer()
        self.steps = 0
        self.peak = 0  # the highest MLX peak memory any step reached

    def __len__(self) -> int:
        return len(self.live)

    def close(self) -> None:
        self.gen.close()

    # ---- join / leave -------------------------------------------------------------------------

    def join(self, seq: Sequence) -> None:
        from mlx_lm.generate import StopSequences
        from mlx_lm.models.cache import make_prompt_cache

        req = seq.req
        hit = self.prefix_cache.take(req.prompt, req.max_kv_size, req.kv_bits)
        cache = hit.cache if hit.cache is not None else make_prompt_cache(
            self.model, max_kv_size=req.max_kv_size
        )  # fmt: skip
        seq.reused = hit.reused
        sampler, processors = sampling_parts(seq)
        stops = StopSequences([(t,) for t in sorted(seq.eos)] or None)
        self.sizer.set_full(req.prefill_step_size)
        (seq.uid,) = self.gen.insert(
            [list(req.prompt[hit.reused :])],
            max_tokens=[req.max_tokens],
            caches=[cache],
            # What the cache already holds: the processors' token context starts from it.
            all_tokens=[list(req.prompt[: hit.reused])],
            samplers=[sampler],
            logits_processors=[processors],
            stop_sequences=[stops],
        )
        self.live[seq.uid] = seq

    def leave(self, seq: Sequence) -> None:
        """Take ``seq`` out of the batch between steps, keeping its cache for later requests."""
        assert seq.uid is not None
        self.live.pop(seq.uid, None)
        caches = self.gen.remove([seq.uid], return_prompt_caches=True)
        if seq.uid in caches:
            cache, tokens = caches[seq.uid]
            keep_cache(self.prefix_cache, seq, list(tokens), list(cache))

    def abandon(self) -> list[Sequence]:
        """Forget every sequence (after a failed step); the caller tells them why."""
        seqs = list(self.live.values())
        self.live.clear()
        return seqs

    # ---- stepping -----------------------------------------------------------------------------

    def step(self) -> int:
        """One decode step for every decoding sequence and one prefill chunk for joiners;
        the number of tokens sampled."""
        import mlx.core as mx

        decoding = sum(1 for s in self.live.values() if s.generated)
        self.gen.prefill_step_size = self.sizer.step_size(decoding)
        start = time.perf_counter()
        prompt_responses, responses = self.gen.next()
        elapsed = time.perf_counter() - start
        peak = int(mx.get_peak_memory())
        mx.reset_peak_memory()  # so each sequence's peak covers only the steps it was in
        self.peak = max(self.peak, peak)
        for seq in self.live.values():
            seq.peak = max(seq.peak, peak)
        self.steps += 1
        self.sizer.observe(elapsed, decoding, prefilled=bool(prompt_responses))
        sampled = 0
        for r in responses:
            found = self.live.get(r.uid)
            if found is None:
                continue
            seq = found
            if seq.req.cancel.is_set():
                # Cancelled during this step: its token is not output (or counted).
                if r.finish_reason is not None:
                    self.live.pop(r.uid, None)
                    seq.emit(seq.finish(seq.req.cancel_reason))
                    keep_cache(self.prefix_cache, seq, list(r.all_tokens), list(r.prompt_cache))
                continue
            sampled += 1
            chunk = seq.add(int(r.token), r.logprobs)
            if chunk is None:  # EOS
                seq.emit(seq.finish("stop"))
            else:
                seq.emit(chunk)
            if r.finish_reason is not None:
                self.live.pop(r.uid, None)
                if not seq.done:  # the generator's own limit; ours agrees, this is a guard
                    seq.emit(seq.finish(r.finish_reason))
                keep_cache(self.prefix_cache, seq, list(r.all_tokens), list(r.prompt_cache))
        for seq in [s for s in self.live.values() if s.error is not None]:
            self.leave(seq)
            seq.done = True
            seq.emit(seq.error)
        return sampled
