"""OpenAI chat-completions request schema and the response/chunk shapes.

Requests are validated by pydantic. Fields that clients commonly send but that change nothing
here (``user``, ``metadata``, ``store``, ``service_tier``…) are accepted and ignored
(``extra="allow"``); values mlxd cannot honour are rejected with a 400 that names the field
instead of being silently dropped.

Responses are built as plain dicts: a streamed reply sends one chunk per token, and building a
pydantic object per token costs more than the JSON encoding itself.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.errors import BadRequest


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
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    logit_bias: dict[str, float] | None = None
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

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        if len(items) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must not be empty")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        if self.logit_bias:
            for key in self.logit_bias:
                if not key.lstrip("-").isdigit():
                    raise BadRequest(
                        f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
                    )
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


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


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
