"""The API translations as data tables, without a model: requests → chat fields, events → shapes."""

from __future__ import annotations

from typing import Any

import pytest

from mlxd.apis import anthropic, completions, ollama, responses
from mlxd.apis.common import BlockEvent, Blocks, Call
from mlxd.chat import Delta, Finish, Usage
from mlxd.config import ConfigError, parse_models
from mlxd.errors import BadRequest, NotFound
from mlxd.parsers.base import ToolCallDelta

# ---- the block view every stream is drawn from ----------------------------------------------


def _run_blocks(deltas: list[Delta]) -> list[tuple[str, str, int, str]]:
    blocks = Blocks()
    events: list[BlockEvent] = []
    for d in deltas:
        events += blocks.feed(d)
    events += blocks.close()
    return [(e.action, e.kind, e.index, e.text) for e in events]


BLOCK_CASES = {
    "text-only": (
        [Delta(content="Hel"), Delta(content="lo")],
        [
            ("open", "text", 0, ""),
            ("delta", "text", 0, "Hel"),
            ("delta", "text", 0, "lo"),
            ("close", "text", 0, "Hello"),
        ],
    ),
    "thinking-then-text": (
        [Delta(reasoning="hmm"), Delta(reasoning="!", content="Yes")],
        [
            ("open", "reasoning", 0, ""),
            ("delta", "reasoning", 0, "hmm"),
            ("delta", "reasoning", 0, "!"),
            ("close", "reasoning", 0, "hmm!"),
            ("open", "text", 1, ""),
            ("delta", "text", 1, "Yes"),
            ("close", "text", 1, "Yes"),
        ],
    ),
    "text-then-two-calls": (
        [
            Delta(content="Ok"),
            Delta(
                tool_calls=[
                    ToolCallDelta(0, "call_a", "f", ""),
                    ToolCallDelta(0, None, None, '{"x"'),
                ]
            ),
            Delta(tool_calls=[ToolCallDelta(0, None, None, ": 1}")]),
            Delta(tool_calls=[ToolCallDelta(1, "call_b", "g", "{}")]),
        ],
        [
            ("open", "text", 0, ""),
            ("delta", "text", 0, "Ok"),
            ("close", "text", 0, "Ok"),
            ("open", "tool", 1, ""),
            ("delta", "tool", 1, '{"x"'),
            ("delta", "tool", 1, ": 1}"),
            ("close", "tool", 1, '{"x": 1}'),
            ("open", "tool", 2, ""),
            ("delta", "tool", 2, "{}"),
            ("close", "tool", 2, "{}"),
        ],
    ),
    "nothing": ([], []),
}


@pytest.mark.parametrize(("deltas", "expected"), BLOCK_CASES.values(), ids=BLOCK_CASES.keys())
def test_blocks(deltas: list[Delta], expected: list[tuple[str, str, int, str]]) -> None:
    assert _run_blocks(deltas) == expected


def finish(reason: str = "stop", stop: str | None = None, cached: int = 0) -> Finish:
    return Finish(reason, Usage(10, 4, cached), stop)


# ---- Anthropic --------------------------------------------------------------------------------


def claude(**kw: Any) -> anthropic.MessagesRequest:
    base: dict[str, Any] = {
        "model": "m",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
    }
    return anthropic.MessagesRequest.model_validate({**base, **kw})


def test_anthropic_messages_translation() -> None:
    req = claude(
        system=[{"type": "text", "text": "Be "}, {"type": "text", "text": "kind."}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "use the tool", "signature": "s"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"city": "Oslo"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "no such city"}],
                        "is_error": True,
                    },
                    {"type": "text", "text": "Try again."},
                ],
            },
        ],
    )
    assert anthropic.to_messages(req) == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "use the tool",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "w", "arguments": {"city": "Oslo"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: no such city"},
        {"role": "user", "content": "Try again."},
    ]


TOOL = {"name": "w", "input_schema": {"type": "object"}}
CHOICES = {
    "auto": ({"type": "auto"}, "auto", None),
    "any": ({"type": "any"}, "required", None),
    "none": ({"type": "none"}, "none", None),
    "tool": ({"type": "tool", "name": "w"}, {"type": "function", "function": {"name": "w"}}, None),
    "one-at-a-time": ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
}


@pytest.mark.parametrize(("choice", "chat", "parallel"), CHOICES.values(), ids=CHOICES.keys())
def test_anthropic_tool_choice(choice: dict[str, Any], chat: Any, parallel: bool | None) -> None:
    fields = anthropic.chat_fields(claude(tools=[TOOL], tool_choice=choice))
    assert fields["tool_choice"] == chat
    assert fields.get("parallel_tool_calls") is parallel
    assert fields["tools"][0]["function"]["parameters"] == {"type": "object"}


THINKING = {
    "enabled": ({"type": "enabled", "budget_tokens": 2000}, {"enable_thinking": True}),
    "disabled": ({"type": "disabled"}, {"enable_thinking": False}),
    "absent": (None, None),
}


@pytest.mark.parametrize(("thinking", "kwargs"), THINKING.values(), ids=THINKING.keys())
def test_anthropic_thinking_switch(thinking: Any, kwargs: Any) -> None:
    fields = anthropic.chat_fields(claude(thinking=thinking, stop_sequences=["\n\n"], top_k=5))
    assert fields.get("chat_template_kwargs") == kwargs
    assert fields["stop"] == ["\n\n"] and fields["top_k"] == 5 and fields["max_tokens"] == 10


@pytest.mark.parametrize(
    ("bad", "param"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages[0].content[0].type",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "tool_use", "id": "x", "name": "n"}]}
                ]
            },
            "messages[0].content[0].type",
        ),
        ({"tools": [{"name": "web", "type": "web_search_20250305"}]}, "tools[0].type"),
        ({"tools": [TOOL], "tool_choice": {"type": "tool"}}, "tool_choice"),
    ],
    ids=["image", "tool_use-from-user", "server-tool", "tool-without-name"],
)
def test_anthropic_refusals_name_the_field(bad: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as e:
        anthropic.chat_fields(claude(**bad))
    assert e.value.param == param


def test_anthropic_output_config() -> None:
    fields = anthropic.chat_fields(
        claude(output_config={"effort": "max", "format": {"type": "json_schema",
                                                          "schema": {"type": "object"}}})
    )  # fmt: skip
    assert fields["reasoning_effort"] == "high"
    assert fields["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": {"type": "object"}},
    }


STOPS = {
    "eos": (finish("stop"), "end_turn"),
    "stop-string": (finish("stop", "###"), "stop_sequence"),
    "length": (finish("length"), "max_tokens"),
    "tools": (finish("tool_calls"), "tool_use"),
}


@pytest.mark.parametrize(("fin", "reason"), STOPS.values(), ids=STOPS.keys())
def test_anthropic_stop_reason(fin: Finish, reason: str) -> None:
    assert anthropic.stop_reason(fin) == reason


def test_anthropic_usage_counts_cache_reads_apart() -> None:
    assert anthropic.usage(finish(cached=6)) == {
        "input_tokens": 4,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 6,
        "output_tokens": 4,
    }


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (404, "not_found_error"),
        (503, "overloaded_error"),
        (500, "api_error"),
    ],
)
def test_anthropic_error_shape(status: int, kind: str) -> None:
    err = BadRequest("nope")
    err.status_code = status
    assert anthropic.error_body(err) == {
        "type": "error",
        "error": {"type": kind, "message": "nope"},
    }


# ---- Responses --------------------------------------------------------------------------------


def resp(**kw: Any) -> responses.ResponsesRequest:
    return responses.ResponsesRequest.model_validate({"model": "m", "input": "hi", **kw})


def test_responses_input_items() -> None:
    items = [
        {"role": "developer", "content": "Rules."},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Weather?"}],
        },
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "need tool"}],
        },
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call", "call_id": "c2", "name": "t", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "rain"},
        {
            "type": "function_call_output",
            "call_id": "c2",
            "output": [{"type": "input_text", "text": "9:00"}],
        },
        {"role": "assistant", "content": [{"type": "output_text", "text": "Rainy."}]},
    ]
    assert responses.input_messages(items) == [
        {"role": "system", "content": "Rules."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "need tool",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "w", "arguments": '{"city":"Oslo"}'},
                },
                {"id": "c2", "type": "function", "function": {"name": "t", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
        {"role": "tool", "tool_call_id": "c2", "content": "9:00"},
        {"role": "assistant", "content": "Rainy."},
    ]


def test_responses_reasoning_comes_back_from_encrypted_content() -> None:
    items = [
        {"role": "user", "content": "q"},
        {"type": "reasoning", "summary": [], "encrypted_content": "thought"},
        {"role": "assistant", "content": "a"},
    ]
    assert responses.input_messages(items)[1] == {
        "role": "assistant", "content": "a", "reasoning_content": "thought"
    }  # fmt: skip
    item = responses.reasoning_item("rs_1", "thought", opaque=True)
    assert item["encrypted_content"] == "thought"
    assert "encrypted_content" not in responses.reasoning_item("rs_1", "thought")


def test_responses_request_fields() -> None:
    fields = responses.chat_fields(
        resp(
            instructions="Be brief.",
            max_output_tokens=7,
            reasoning={"effort": "low"},
            tools=[{"type": "function", "name": "w", "parameters": {"type": "object"}}],
            tool_choice={"type": "function", "name": "w"},
            parallel_tool_calls=False,
            text={
                "format": {
                    "type": "json_schema",
                    "name": "out",
                    "schema": {"type": "object"},
                    "strict": True,
                }
            },
        ),
        history=[{"role": "user", "content": "earlier"}],
    )
    assert fields["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "earlier"},
        {"role": "user", "content": "hi"},
    ]
    assert fields["max_tokens"] == 7 and fields["reasoning_effort"] == "low"
    assert fields["tool_choice"] == {"type": "function", "function": {"name": "w"}}
    assert fields["parallel_tool_calls"] is False
    assert fields["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True},
    }


@pytest.mark.parametrize(
    ("bad", "param"),
    [
        ({"tools": [{"type": "file_search"}]}, "tools[0].type"),
        ({"input": [{"type": "input_image_call"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"background": True}, "background"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
    ],
    ids=["hosted-tool", "unknown-item", "image", "background", "hosted-choice"],
)
def test_responses_refusals_name_the_field(bad: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as e:
        responses.chat_fields(resp(**bad), [])
    assert e.value.param == param


def test_responses_store_is_bounded_and_says_what_is_missing() -> None:
    store = responses.ResponseStore(size=2)
    for i in range(3):
        store.put(responses.Stored({"id": f"resp_{i}"}, []))
    with pytest.raises(NotFound) as e:
        store.get("resp_0", "previous_response_id")
    assert e.value.status_code == 404 and e.value.param == "previous_response_id"
    assert store.get("resp_2").response == {"id": "resp_2"}


def test_responses_reply_becomes_the_next_turns_history() -> None:
    output = responses.output_items(
        responses.Folded("Sunny.", "think", [Call("call_1", "w", '{"a": 1}')], finish())
    )
    assert [item["type"] for item in output] == ["reasoning", "message", "function_call"]
    assert responses.reply_messages(output) == [
        {
            "role": "assistant",
            "content": "Sunny.",
            "reasoning_content": "think",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "w", "arguments": '{"a": 1}'},
                }
            ],
        },
    ]


# ---- Completions and fill-in-the-middle -------------------------------------------------------


class VocabTokenizer:
    """Just enough tokenizer: one id per character, plus whole special tokens from a vocab."""

    bos_token_id = 1
    unk_token_id = 0

    def __init__(self, specials: list[str]) -> None:
        self.specials = {tok: 100 + i for i, tok in enumerate(specials)}

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.specials.get(token, self.unk_token_id)

    def __len__(self) -> int:
        return 1000

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([self.bos_token_id] if add_special_tokens else []) + [ord(c) for c in text]


FIM = {
    "qwen": (["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"], []),
    "starcoder": (["<fim_prefix>", "<fim_middle>", "<fim_suffix>"], []),
    "codellama": (["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"], [1]),
    "deepseek": (["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"], []),
}


@pytest.mark.parametrize(("specials", "bos"), FIM.values(), ids=FIM.keys())
def test_fim_prompt_uses_the_models_own_tokens(specials: list[str], bos: list[int]) -> None:
    tok = VocabTokenizer(specials)
    found = completions.fim_style(tok)
    assert found is not None
    style, (pre, suf, mid) = found
    ids, stops = completions.build_prompt(tok, "m", "ab", "cd")
    assert ids == [*bos, pre, ord("a"), ord("b"), suf, ord("c"), ord("d"), mid]
    assert stops == list(style.stops)


def test_fim_without_tokens_is_a_400_and_plain_prompts_keep_bos() -> None:
    tok = VocabTokenizer(["<|im_start|>"])
    with pytest.raises(BadRequest) as e:
        completions.build_prompt(tok, "m", "ab", "cd")
    assert e.value.param == "suffix" and "fill-in-the-middle" in e.value.message
    assert completions.build_prompt(tok, "m", "ab", None) == ([1, 97, 98], [])
    assert completions.build_prompt(tok, "m", [5, 6], None) == ([5, 6], [])
    with pytest.raises(BadRequest):
        completions.build_prompt(tok, "m", [], None)
    with pytest.raises(BadRequest) as e:
        completions.build_prompt(tok, "m", [5, 1000], None)
    assert e.value.param == "prompt[1]"


def test_completion_fields() -> None:
    req = completions.CompletionRequest.model_validate(
        {"model": "m", "prompt": ["only"], "stop": "\n", "seed": 3}
    )
    assert req.single_prompt() == "only"
    fields = completions.chat_fields(req, ["<|endoftext|>"])
    assert fields["max_tokens"] == completions.DEFAULT_MAX_TOKENS
    assert fields["stop"] == ["\n", "<|endoftext|>"] and fields["seed"] == 3
    fields = completions.chat_fields(
        completions.CompletionRequest(model="m", prompt="x", logprobs=2), []
    )
    assert fields["logprobs"] is True and fields["top_logprobs"] == 2
    with pytest.raises(BadRequest) as e:  # the prompt's own logprobs are not computed
        completions.chat_fields(
            completions.CompletionRequest(model="m", prompt="x", logprobs=2, echo=True), []
        )
    assert e.value.param == "echo"


# ---- Ollama -----------------------------------------------------------------------------------


def test_ollama_options_and_switches() -> None:
    body = ollama.ChatBody.model_validate(
        {
            "model": "qwen:latest",
            "keep_alive": "10m",
            "think": True,
            "format": "json",
            "options": {
                "temperature": 0.1,
                "num_predict": 9,
                "num_ctx": 4096,
                "stop": ["x"],
                "seed": 1,
                "top_k": 3,
                "top_p": 0.5,
                "repeat_penalty": 1.1,
                "mirostat": 0,
            },
        }
    )
    fields = ollama.chat_fields(body, [])
    assert fields["model"] == "qwen"
    assert (fields["temperature"], fields["max_tokens"], fields["stop"]) == (0.1, 9, ["x"])
    assert (fields["seed"], fields["top_k"], fields["top_p"]) == (1, 3, 0.5)
    assert fields["repetition_penalty"] == 1.1 and fields["keep_alive"] == "10m"
    assert fields["chat_template_kwargs"] == {"enable_thinking": True}
    assert fields["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize(
    ("extra", "key", "value"),
    [
        ({"options": {"num_predict": -1}}, "max_tokens", None),
        ({"think": "high"}, "reasoning_effort", "high"),
        (
            {"format": {"type": "object"}},
            "response_format",
            {
                "type": "json_schema",
                "json_schema": {"name": "ollama", "schema": {"type": "object"}},
            },
        ),
    ],
    ids=["unlimited", "think-level", "schema"],
)
def test_ollama_field_table(extra: dict[str, Any], key: str, value: Any) -> None:
    body = ollama.ChatBody.model_validate({"model": "m", **extra})
    assert ollama.chat_fields(body, []).get(key) == value


def test_ollama_messages_with_tool_calls() -> None:
    body = ollama.ChatBody.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "w?"},
                {
                    "role": "assistant",
                    "content": "",
                    "thinking": "t",
                    "tool_calls": [
                        {"function": {"name": "w", "arguments": {"city": "Oslo"}}},
                        {"function": {"name": "w", "arguments": '{"city": "Rome"}'}},
                    ],
                },
                {"role": "tool", "content": "rain", "tool_name": "w"},
            ],
        }
    )
    out = ollama.messages_of(body)
    assert out[1]["reasoning_content"] == "t"
    assert [c["function"]["arguments"] for c in out[1]["tool_calls"]] == [
        {"city": "Oslo"},
        {"city": "Rome"},
    ]
    assert out[2] == {"role": "tool", "content": "rain", "name": "w"}
    bad = ollama.ChatBody.model_validate(
        {
            "model": "m",
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "w", "arguments": "[1]"}}],
                }
            ],
        }
    )
    with pytest.raises(BadRequest) as e:
        ollama.messages_of(bad)
    assert e.value.param == "messages[0].tool_calls[0].function.arguments"


# ---- model-name patterns ----------------------------------------------------------------------


def test_patterns_map_client_names_to_local_models() -> None:
    models = parse_models(
        {
            "models": [
                {"id": "big", "source": {"path": "x"}},
                {"id": "small", "source": {"path": "y"}},
            ],
            "patterns": {"claude-*haiku*": "small", "claude-*": "big"},
        },
        "t",
    )
    assert models.match_pattern("claude-3-5-haiku-20241022") == "small"
    assert models.match_pattern("claude-sonnet-4-5") == "big"
    assert models.match_pattern("gpt-4o") is None
    with pytest.raises(ConfigError, match="patterns"):
        parse_models(
            {"models": [{"id": "a", "source": {"path": "x"}}], "patterns": {"claude-*": "missing"}},
            "t",
        )
