"""OpenAI chat-completions request schema and the response/chunk shapes.

Requests are validated by pydantic. Fields that clients commonly send but that change nothing
here (``user``, ``metadata``, ``store``, ``service_tier``…) are accepted and ignored
(``extra="allow"``); values mlxd cannot honour are rejected with a 400 that names the field
instead of being silently dropped.

Hostile input is refused here with a 400 naming the field: non-finite numbers anywhere in a
numeric field, seeds outside what MLX accepts, lone surrogates (they cannot be encoded for the
tokenizer), JSON nested deeper than any real request, and tool ``parameters`` that are not a valid
JSON Schema. Checks that need the model (token ids against the vocabulary, ``top_k``) are in
:func:`server.chat.check_against_model`.

Responses are built as plain dicts: a streamed reply sends one chunk per token, and building a
pydantic object per token costs more than the JSON encoding itself.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import ValidationError

from mlxd.errors import BadRequest

MAX_JSON_DEPTH = 64
SEED_LIMIT = 1 << 64  # mx.random.seed takes an unsigned 64-bit integer
LOGIT_BIAS_RANGE = 100.0  # OpenAI's range: -100 (ban) .. 100 (force)
MAX_LOGIT_BIAS = 1024
MAX_STOP_LENGTH = 4096

# OpenAI's ranges of the sampling parameters, declared once for every OpenAI-style request
# (chat, completions, responses) so that they cannot drift apart. None: the model's default.
Temperature = Annotated[float | None, Field(ge=0, le=2)]
TopP = Annotated[float | None, Field(gt=0, le=1)]
TopK = Annotated[int | None, Field(ge=-1)]
MinP = Annotated[float | None, Field(ge=0, le=1)]
Penalty = Annotated[float | None, Field(ge=-2, le=2)]  # presence_penalty, frequency_penalty
RepetitionPenalty = Annotated[float | None, Field(gt=0)]


def check_json_value(data: Any) -> None:
    """Refuse what JSON can carry but no field can use: deep nesting, lone surrogates.

    Iterative, so a deep document cannot exhaust the stack here; the path in the error is
    written the way the client wrote the document (``messages[0].content``).
    """
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(
                f"{path or 'the body'}: JSON nested deeper than {MAX_JSON_DEPTH} levels",
                param=path or None,
            )
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                name = key.encode("utf-8", "backslashreplace").decode()  # printable in errors
                where = f"{path}.{name}" if path else name
                _check_text(key, where)
                stack.append((item, where, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # The path may hold the surrogate itself (a key): escape it, or the error cannot be sent.
        where = path.encode("utf-8", "backslashreplace").decode("utf-8")
        raise BadRequest(
            f"{where or 'the body'}: contains a lone UTF-16 surrogate "
            f"({text[exc.start]!r} at offset {exc.start}); send valid Unicode",
            param=where or None,
        ) from None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "input_text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None

    @field_validator("parameters")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # Parsers and constrained decoding compile this schema; an invalid one must be the
        # request's 400, not a failure halfway through generation.
        if value is not None:
            validator = jsonschema.validators.validator_for(value, jsonschema.Draft202012Validator)
            try:
                validator.check_schema(value)
            except jsonschema.SchemaError as exc:
                where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
                raise ValueError(f"not a valid JSON Schema at {where}: {exc.message}") from None
        return value


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: dict[str, str]

    @field_validator("function")
    @classmethod
    def _has_name(cls, value: dict[str, str]) -> dict[str, str]:
        if not value.get("name"):
            raise ValueError("function.name is required")
        return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``text``, ``json_object`` (any JSON object) or ``json_schema`` (enforced while decoding)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _has_schema(self) -> ResponseFormat:
        missing = self.json_schema is None or not self.json_schema.schema_
        if self.type == "json_schema" and missing:
            raise BadRequest(
                "response_format.json_schema: type 'json_schema' needs json_schema.schema",
                param="response_format.json_schema",
            )
        return self

    @property
    def schema_dict(self) -> dict[str, Any] | None:
        return self.json_schema.schema_ if self.json_schema is not None else None


class ChatRequest(BaseModel):
    # NaN and infinity parse from JSON (Python accepts the literals) but mean nothing here.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    min_p: MinP = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    repetition_penalty: RepetitionPenalty = None
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int | None = Field(default=None, ge=1, le=16)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    keep_alive: str | int | None = None
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _legacy_functions(cls, data: Any) -> Any:
        return map_legacy_functions(data) if isinstance(data, dict) else data

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        if len(items) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_LENGTH for s in items):
            raise ValueError(f"stop sequences must be at most {MAX_STOP_LENGTH} characters")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None) -> int | None:
        if value == -1:
            return None  # what many clients send to mean "random"
        if value is not None and not 0 <= value < SEED_LIMIT:
            raise ValueError(f"must be -1 (random) or in [0, 2**64), got {value}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
            if not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:
                raise ValueError(f"the bias of token {key} must be in [-100, 100], got {bias}")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        named = isinstance(self.tool_choice, NamedToolChoice)
        if (named or self.tool_choice == "required") and not self.tools:
            raise BadRequest("tool_choice requires a non-empty 'tools' list", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            wanted = self.tool_choice.function["name"]
            if wanted not in {t.function.name for t in self.tools or []}:
                raise BadRequest(
                    f"tool_choice names function {wanted!r}, which is not in 'tools'",
                    param="tool_choice",
                )
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def map_legacy_functions(data: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's deprecated function-calling fields, rewritten as their tool equivalents.

    ``functions`` → ``tools``, ``function_call`` → ``tool_choice``, an assistant message's
    ``function_call`` → one ``tool_calls`` entry, and a ``role: "function"`` result → a
    ``role: "tool"`` message answering that call. Sending both forms is refused: which one
    would win is not obvious.
    """
    if (
        "functions" not in data
        and "function_call" not in data
        and not any(
            isinstance(m, dict) and (m.get("role") == "function" or "function_call" in m)
            for m in data.get("messages") or []
        )
    ):
        return data
    data = dict(data)
    for old, new in (("functions", "tools"), ("function_call", "tool_choice")):
        if old in data and data.get(new) is not None:
            raise BadRequest(f"send either '{new}' or the deprecated '{old}', not both", param=old)
    functions = data.pop("functions", None)
    if functions is not None:
        if not isinstance(functions, list):
            raise BadRequest("functions: must be an array", param="functions")
        for i, function in enumerate(functions):  # checked here to name them as sent
            try:
                FunctionDef.model_validate(function)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in err["loc"])
                raise BadRequest(f"functions[{i}]{where}: {err['msg']}",
                                 param=f"functions[{i}]{where}") from None  # fmt: skip
        data["tools"] = [{"type": "function", "function": f} for f in functions]
    choice = data.pop("function_call", None)
    if isinstance(choice, dict):
        data["tool_choice"] = {"type": "function", "function": choice}
    elif choice is not None:
        data["tool_choice"] = choice
    messages = data.get("messages")
    if isinstance(messages, list):
        data["messages"] = _legacy_messages(messages)
    return data


def _legacy_messages(messages: list[Any]) -> list[Any]:
    out: list[Any] = []
    last_call: str | None = None
    for i, msg in enumerate(messages):
        if isinstance(msg, dict) and isinstance(msg.get("function_call"), dict):
            msg = dict(msg)
            last_call = f"call_legacy_{i}"
            msg["tool_calls"] = [{"id": last_call, "type": "function",
                                  "function": msg.pop("function_call")}]  # fmt: skip
        elif isinstance(msg, dict) and msg.get("role") == "function":
            msg = {**msg, "role": "tool", "tool_call_id": msg.get("tool_call_id") or last_call}
        out.append(msg)
    return out


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage_dict(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def dumps(obj: Any) -> str:
    """Compact JSON, non-ASCII kept as is (smaller SSE frames, readable in curl)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
