"""OpenAI text completions (``/v1/completions``), with fill-in-the-middle through ``suffix``.

The prompt goes to the model as is (no chat template): the chat service's raw-prompt path, so
admission, sampling, stop strings and the prefix cache are the chat path's own. With a
``suffix``, the prompt is built with the model's own FIM tokens, found in its vocabulary:

* Qwen2.5/Qwen3-Coder: ``<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>``
* StarCoder/StarCoder2: ``<fim_prefix>P<fim_suffix>S<fim_middle>``
* CodeLlama: ``▁<PRE>P▁<SUF>S▁<MID>``
* DeepSeek-Coder: ``<｜fim▁begin｜>P<｜fim▁hole｜>S<｜fim▁end｜>``

A model with none of these answers a suffix with a 400 (it would otherwise write a plain
continuation and ignore the suffix). The markers are inserted as token ids, never as text, so a
prompt that happens to contain the marker text cannot forge them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from mlxd.api import sse_response, start_run, until_disconnected
from mlxd.apis.common import app_state, chat_request, guarded, parse_body
from mlxd.chat import ChatRun, Finish
from mlxd.errors import BadRequest, MlxdError
from mlxd.fold import fold_choices
from mlxd.logprobs import TokenLogprob
from mlxd.protocol import (
    ChatRequest,
    MinP,
    Penalty,
    RepetitionPenalty,
    StreamOptions,
    Temperature,
    TopK,
    TopP,
    dumps,
    usage_dict,
)
from mlxd.render import SYSTEM_FINGERPRINT

router = APIRouter()

# OpenAI's default for /v1/completions (the chat API has none).
DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class FimStyle:
    name: str
    prefix: str
    suffix: str
    middle: str
    stops: tuple[str, ...]  # what the model writes when the middle is done, besides its EOS


FIM_STYLES = (
    FimStyle(
        "qwen",
        "<|fim_prefix|>",
        "<|fim_suffix|>",
        "<|fim_middle|>",
        ("<|endoftext|>", "<|file_sep|>", "<|fim_pad|>"),
    ),
    FimStyle(
        "starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", ("<|endoftext|>", "<file_sep>")
    ),
    FimStyle("codellama", "▁<PRE>", "▁<SUF>", "▁<MID>", ("<EOT>",)),
    FimStyle(
        "deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", ("<｜end▁of▁sentence｜>",)
    ),
)


def token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` if it is one whole token of the vocabulary."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(tid, int) or tid == getattr(tokenizer, "unk_token_id", None):
        return None
    return tid


def fim_style(tokenizer: Any) -> tuple[FimStyle, list[int]] | None:
    """The model's FIM style and its (prefix, suffix, middle) ids, or None."""
    for style in FIM_STYLES:
        ids = [token_id(tokenizer, t) for t in (style.prefix, style.suffix, style.middle)]
        if all(i is not None for i in ids):
            return style, [i for i in ids if i is not None]
    return None


Prompt = str | list[int]


def encode(tokenizer: Any, prompt: Prompt, *, special: bool) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt, add_special_tokens=special))
    size = len(tokenizer)
    for i, tid in enumerate(prompt):
        if not 0 <= tid < size:
            raise BadRequest(f"token id {tid} is outside the vocabulary (0..{size - 1})",
                             param=f"prompt[{i}]")  # fmt: skip
    return list(prompt)


def build_prompt(
    tokenizer: Any, model: str, prompt: Prompt, suffix: str | None
) -> tuple[list[int], list[str]]:
    """Prompt token ids (FIM-framed when there is a suffix) and the extra stop strings."""
    if suffix is None:
        ids = encode(tokenizer, prompt, special=True)
        if not ids:
            raise BadRequest("prompt must not be empty", param="prompt")
        return ids, []
    found = fim_style(tokenizer)
    if found is None:
        raise BadRequest(
            f"model {model!r} has no fill-in-the-middle tokens in its vocabulary (Qwen "
            "<|fim_prefix|>, StarCoder <fim_prefix>, CodeLlama <PRE>, DeepSeek <｜fim▁begin｜>), "
            "so 'suffix' cannot be used with it; use a code model or leave out 'suffix'",
            param="suffix",
        )
    style, (pre, suf, mid) = found
    bos = [tokenizer.bos_token_id] if style.name == "codellama" and tokenizer.bos_token_id else []
    body = encode(tokenizer, prompt, special=False)
    tail = list(tokenizer.encode(suffix, add_special_tokens=False))
    return [*bos, pre, *body, suf, *tail, mid], list(style.stops)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    max_tokens: int | None = Field(default=DEFAULT_MAX_TOKENS, ge=1)
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    min_p: MinP = None
    n: int | None = None
    best_of: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    stop: str | list[str] | None = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    repetition_penalty: RepetitionPenalty = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    keep_alive: str | int | None = None

    def single_prompt(self) -> Prompt:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise BadRequest(
                    "one prompt per request (send a request per prompt)", param="prompt"
                )
            return p[0]
        return p  # type: ignore[return-value]


SAMPLING_FIELDS = (
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "seed",
    "keep_alive",
    "stream_options",
    "n",
)


def chat_fields(req: CompletionRequest, extra_stops: list[str]) -> dict[str, Any]:
    """The request's limits and sampling in the chat service's terms.

    The messages are a placeholder: the prompt travels as token ids (``raw_prompt``).
    """
    if req.best_of is not None and req.best_of != 1:
        raise BadRequest("best_of > 1 is not supported", param="best_of")
    if req.logprobs is not None and req.echo:
        raise BadRequest(
            "logprobs with echo: the prompt's logprobs are not computed; send echo: false",
            param="echo",
        )
    data = {name: getattr(req, name) for name in SAMPLING_FIELDS}
    if req.logprobs is not None:
        data["logprobs"], data["top_logprobs"] = True, req.logprobs
    data["messages"] = [{"role": "user", "content": ""}]
    if extra_stops:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        data["stop"] = stops + [s for s in extra_stops if s not in stops]
    return data


def to_chat_request(req: CompletionRequest, extra_stops: list[str]) -> ChatRequest:
    return chat_request(chat_fields(req, extra_stops))


class Logprobs:
    """The legacy ``logprobs`` object of one choice: ``tokens``, ``token_logprobs``,
    ``top_logprobs`` (token text → logprob, the ``logprobs`` most likely) and ``text_offset``
    (where each token starts in the choice's text, the echoed prompt included)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def next(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        """The object for these tokens, the ones after the previous call's."""
        offsets = []
        for entry in entries:
            offsets.append(self.offset)
            self.offset += len(entry.token)
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
            "text_offset": offsets,
        }


def _choice(
    text: str, finish: str | None, index: int = 0, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


class Envelope:
    def __init__(self, run: ChatRun) -> None:
        self.head = {
            "id": "cmpl-" + run.id.removeprefix("chatcmpl-"),
            "object": "text_completion",
            "created": run.created,
            "model": run.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def body(
        self, choices: list[dict[str, Any]], finishes: list[Finish] | None = None
    ) -> dict[str, Any]:
        out = {**self.head, "choices": choices}
        if finishes:  # the prompt once, every choice's completion tokens
            first = finishes[0].usage
            completion = sum(f.usage.completion_tokens for f in finishes)
            out["usage"] = usage_dict(first.prompt_tokens, completion, first.cached_tokens)
        return out


async def completion(run: ChatRun, echo: str) -> dict[str, Any]:
    choices = await fold_choices(run)
    with_logprobs = run.prepared.logprobs is not None
    out = []
    for i, c in enumerate(choices):
        logprobs = Logprobs(len(echo)).next(c.logprobs) if with_logprobs else None
        out.append(_choice(echo + c.content, c.finish.reason, i, logprobs))
    return Envelope(run).body(out, [c.finish for c in choices])


async def _chunks(run: ChatRun, echo: str, include_usage: bool) -> AsyncIterator[str]:
    env = Envelope(run)
    n = len(run.generations)
    if echo:
        for i in range(n):
            yield dumps(env.body([_choice(echo, None, i)]))
    with_logprobs = run.prepared.logprobs is not None
    offsets = [Logprobs(len(echo)) for _ in range(n)]
    finishes: list[Finish] = []
    async for event in run.events():
        if isinstance(event, Finish):
            finishes.append(event)
            yield dumps(env.body([_choice("", event.reason, event.index)]))
            if include_usage and len(finishes) == n:
                yield dumps(env.body([], finishes))
        elif event.content or (with_logprobs and event.logprobs):
            logprobs = offsets[event.index].next(event.logprobs) if with_logprobs else None
            yield dumps(env.body([_choice(event.content, None, event.index, logprobs)]))


async def stream(run: ChatRun, echo: str, include_usage: bool) -> AsyncIterator[str]:
    """The ``data:`` payloads of a streamed completion, ending with ``[DONE]``."""

    def error(exc: MlxdError) -> str:
        return dumps(exc.to_dict())

    async for frame in guarded(run, _chunks(run, echo, include_usage), error):
        yield frame
    yield "[DONE]"


@router.post("/v1/completions")
async def create_completion(http: Request) -> Response:
    state = app_state(http)
    req = await parse_body(http, CompletionRequest)
    prompt = req.single_prompt()
    entry = state.router.pick_name(req.model)
    tokenizer = await state.registry.tokenizer(entry)
    ids, stops = build_prompt(tokenizer, entry.id, prompt, req.suffix)
    chat = to_chat_request(req, stops)
    run = await start_run(http, chat, entry, raw_prompt=ids)
    echo = "" if not req.echo else prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    headers = {"x-mlxd-model": run.model}
    if req.stream:
        events = stream(run, echo, chat.include_usage)
        return sse_response(events, run, state.settings.sse_ping_seconds, headers)
    body = await until_disconnected(http, run, completion(run, echo))
    if body is None:
        return Response(status_code=499)  # the client is gone
    return JSONResponse(body, headers=headers)
