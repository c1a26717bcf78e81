"""Anthropic Messages, OpenAI Responses and Completions, and Ollama on the real default model,
each through real HTTP with its official SDK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest

from mlxd.config import REPO_ROOT
from tests.conftest import RunningServer, run_server

pytestmark = pytest.mark.e2e

FRANCE = "What is the capital of France?"
# The anthropic SDK no longer has sampling arguments; older clients send them in the body.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("apis-smollm2") / "mlxd.log"
    with run_server(["--config", str(REPO_ROOT / "models.yaml")], log) as running:
        yield running


@pytest.fixture(scope="module")
def claude(server: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.root, api_key="local", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oai(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="local", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def olla(server: RunningServer) -> ollama.Client:
    return ollama.Client(host=server.root, timeout=120)


# ---- Anthropic Messages ------------------------------------------------------------------------


def test_anthropic_message_and_stream_agree(claude: anthropic.Anthropic) -> None:
    kw = {
        "model": "smollm2",
        "max_tokens": 30,
        "extra_body": GREEDY,
        "messages": [{"role": "user", "content": FRANCE}],
    }
    msg = claude.messages.create(**kw)
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "smollm2"
    (block,) = msg.content
    assert block.type == "text" and "Paris" in block.text
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.output_tokens > 0 and msg.usage.input_tokens > 0

    with claude.messages.stream(**kw) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert final.content[0].text == block.text
    assert final.stop_reason == msg.stop_reason
    assert final.usage.output_tokens == msg.usage.output_tokens
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    core = [k for k in kinds if k not in ("text",)]  # the SDK adds a "text" helper per delta
    assert core[1] == "content_block_start" and core[-3] == "content_block_stop"
    assert core[-2] == "message_delta"
    # The second turn shares the first's prompt: the prefix cache reports the reused tokens.
    again = claude.messages.create(**kw)
    total = again.usage.input_tokens + (again.usage.cache_read_input_tokens or 0)
    assert total == msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)


def test_anthropic_raw_event_sequence_includes_ping(server: RunningServer) -> None:
    body = {
        "model": "smollm2",
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    events = []
    with httpx.stream(
        "POST",
        f"{server.root}/v1/messages",
        json=body,
        timeout=120,
        headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
    assert events[:3] == ["message_start", "ping", "content_block_start"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(events[3:-3]) == {"content_block_delta"}


def test_anthropic_stop_sequence_and_max_tokens(claude: anthropic.Anthropic) -> None:
    ask = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    cut = claude.messages.create(model="smollm2", max_tokens=3, messages=ask, extra_body=GREEDY)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3
    full = claude.messages.create(model="smollm2", max_tokens=40, messages=ask, extra_body=GREEDY)
    text = full.content[0].text
    word = next(w for w in text.split() if len(w) > 1)
    stopped = claude.messages.create(
        model="smollm2",
        max_tokens=40,
        messages=ask,
        extra_body=GREEDY,
        stop_sequences=[word],
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert word not in "".join(b.text for b in stopped.content)


def test_anthropic_count_tokens_is_the_prompt_the_model_sees(claude: anthropic.Anthropic) -> None:
    messages = [{"role": "user", "content": FRANCE}]
    system = "You are a geography teacher who answers in one word."
    counted = claude.messages.count_tokens(model="smollm2", system=system, messages=messages)
    msg = claude.messages.create(
        model="smollm2",
        system=system,
        messages=messages,
        max_tokens=1,
    )
    assert counted.input_tokens == msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)
    bare = claude.messages.count_tokens(model="smollm2", messages=messages)
    assert bare.input_tokens != counted.input_tokens


def test_anthropic_errors_have_anthropic_shape(
    claude: anthropic.Anthropic, server: RunningServer
) -> None:
    with pytest.raises(anthropic.NotFoundError) as nf:
        claude.messages.create(
            model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert nf.value.body["type"] == "error"
    assert nf.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(
            model="smollm2", max_tokens=5, messages=[{"role": "robot", "content": "x"}]
        )
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    assert "messages[0].role" in bad.value.body["error"]["message"]
    r = httpx.post(
        f"{server.root}/v1/messages",
        timeout=30,
        json={"model": "smollm2", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]


# ---- OpenAI Responses --------------------------------------------------------------------------


def test_responses_plain_stream_and_get(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model="smollm2", input=FRANCE, max_output_tokens=30, temperature=0)
    assert r.status in ("completed", "incomplete") and "Paris" in r.output_text
    assert r.usage is not None and r.usage.output_tokens > 0
    assert oai.responses.retrieve(r.id).output_text == r.output_text

    kinds, final = [], None
    with oai.responses.stream(
        model="smollm2", input=FRANCE, max_output_tokens=30, temperature=0
    ) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_response()
    assert final.output_text == r.output_text
    expect_start = [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[:5] == expect_start
    end = [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{final.status}",
    ]
    assert kinds[-4:] == end


def test_responses_previous_response_id_and_store(oai: openai.OpenAI) -> None:
    first = oai.responses.create(
        model="smollm2", input="My name is Ada.", max_output_tokens=5, temperature=0
    )
    follow = oai.responses.create(
        model="smollm2",
        input="What is my name?",
        temperature=0,
        max_output_tokens=5,
        previous_response_id=first.id,
    )
    alone = oai.responses.create(
        model="smollm2", input="What is my name?", temperature=0, max_output_tokens=5
    )
    assert follow.usage is not None and alone.usage is not None
    # The follow-up carries the first turn, so its prompt is longer by that turn.
    assert follow.usage.input_tokens > alone.usage.input_tokens + 5
    private = oai.responses.create(model="smollm2", input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(private.id)
    with pytest.raises(openai.NotFoundError) as nf:
        oai.responses.create(model="smollm2", input="x", previous_response_id="resp_missing")
    assert nf.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as bad:
        oai.responses.create(model="smollm2", input="x", tools=[{"type": "web_search"}])
    assert bad.value.body["param"] == "tools[0].type"


# ---- OpenAI Completions ------------------------------------------------------------------------


def test_completions_plain_echo_stream(oai: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    c = oai.completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0)
    assert c.object == "text_completion" and c.choices[0].finish_reason == "length"
    assert c.usage is not None and c.usage.completion_tokens == 6
    text = c.choices[0].text
    assert text.startswith(" Paris")  # a continuation keeps its first token's leading space
    echoed = oai.completions.create(
        model="smollm2", prompt=prompt, max_tokens=6, temperature=0, echo=True
    )
    assert echoed.choices[0].text == prompt + text
    pieces = [
        ch.choices[0].text
        for ch in oai.completions.create(
            model="smollm2", prompt=prompt, max_tokens=6, temperature=0, stream=True
        )
        if ch.choices
    ]
    assert "".join(pieces) == text


def test_completions_refuse_suffix_without_fim_tokens_and_logprobs(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(
            model="smollm2", prompt="def f(", suffix="    return x", max_tokens=4
        )
    assert e.value.body["param"] == "suffix"
    assert "fill-in-the-middle" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="smollm2", prompt=["a", "b"], max_tokens=4)
    assert e.value.body["param"] == "prompt"


# ---- Ollama ------------------------------------------------------------------------------------


def test_ollama_chat_generate_stream_and_json(olla: ollama.Client) -> None:
    messages = [{"role": "user", "content": FRANCE}]
    opts = {"temperature": 0, "num_predict": 20}
    r = olla.chat(model="smollm2:latest", messages=messages, options=opts, stream=False)
    assert r.done and r.done_reason in ("stop", "length") and "Paris" in (r.message.content or "")
    assert r.eval_count and r.prompt_eval_count and r.total_duration
    parts = list(olla.chat(model="smollm2", messages=messages, options=opts, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content or "" for p in parts) == r.message.content
    g = olla.generate(model="smollm2", prompt=FRANCE, options=opts, stream=False)
    assert g.response == r.message.content  # same template path as chat
    raw = olla.generate(
        model="smollm2",
        prompt="The capital of France is",
        raw=True,
        options={"temperature": 0, "num_predict": 4},
        stream=False,
    )
    assert raw.done_reason == "length" and raw.eval_count == 4


def test_ollama_listing_show_ps_version_and_load(
    olla: ollama.Client, server: RunningServer
) -> None:
    names = [m.model for m in olla.list().models]
    assert "smollm2:latest" in names
    shown = olla.show("smollm2")
    assert "completion" in (shown.capabilities or [])
    assert "insert" not in (shown.capabilities or []) and ".Suffix" not in (shown.template or "")
    assert shown.modelinfo and shown.modelinfo["llama.context_length"] == 8192
    olla.generate(model="smollm2", prompt="", keep_alive="5m")  # load
    running = olla.ps().models
    assert [m.model for m in running] == ["smollm2:latest"] and (running[0].size or 0) > 0
    assert httpx.get(f"{server.root}/api/version").json()["version"]
    with pytest.raises(ollama.ResponseError) as e:
        olla.chat(model="missing", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404 and "missing" in e.value.error
    bad = httpx.post(f"{server.root}/api/chat", json={"model": "smollm2", "messages": "x"})
    assert bad.status_code == 400 and set(bad.json()) == {"error"}


def test_prefix_cache_hits_show_in_anthropic_and_responses_usage(
    claude: anthropic.Anthropic, oai: openai.OpenAI
) -> None:
    system = "You are a careful assistant. " * 20  # well past the cache's 64-token minimum
    messages = [{"role": "user", "content": "Say hi."}]
    claude.messages.create(model="smollm2", max_tokens=2, system=system, messages=messages)
    again = claude.messages.create(model="smollm2", max_tokens=2, system=system, messages=messages)
    assert (again.usage.cache_read_input_tokens or 0) > 64
    assert again.usage.input_tokens < 64  # only the part after the shared history is new
    r = oai.responses.create(model="smollm2", instructions=system, input="Say hi.",
                             max_output_tokens=2)  # fmt: skip
    assert r.usage is not None and r.usage.input_tokens_details.cached_tokens > 64
